"""Released AVSBench checkpoints (S4_best.pth, MS3_best.pth): build the model they fit, load them, convert them.

The official files are bare state dicts of the reference model (``model.module.state_dict()``) in the key layout of
``tests/data/reference/avsbench_resnet50_keys.tsv``. They load with ``torch.load(..., weights_only=True)`` and map onto
``AVSModel`` through ``load_avsbench_checkpoint``. The architecture comes from a config
(``configs/avsbench-s4-r50.toml`` or ``-ms3-``): ResNet-50, C = 256, TPAVI at the stages the checkpoint has.
Backbone ImageNet weights are never read here (``model.backbone_weights`` is ignored): every backbone tensor comes
from the checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from avsprep.errors import InputError
from avstrain.checkpoint import CHECKPOINT_FORMAT, make_checkpoint, metadata, read_state_dict_file, save_atomic
from avstrain.config import Config
from avstrain.models import AVSBenchCheckpointError, build_model, load_avsbench_checkpoint

log = logging.getLogger(__name__)


def avsbench_config(config: Config) -> Config:
    """The config as a released checkpoint fits it: no backbone weights file, no crop encoder."""
    model = dataclasses.replace(config.model, backbone_weights=None, crop_mode="off", num_classes=0)
    return dataclasses.replace(config, model=model)


def read_avsbench_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a released checkpoint file (weights-only load). InputError if it is not one."""
    state = read_state_dict_file(path)
    if not isinstance(state, dict):
        raise InputError(path, f"holds a {type(state).__name__}, not a state dict")
    if state.get("format") == CHECKPOINT_FORMAT:
        raise InputError(path, "is an avs-toolkit checkpoint already: evaluate it without --format avsbench")
    return state


def load_avsbench_model(path: str | Path, config: Config) -> tuple[torch.nn.Module, Config]:
    """Build the model of `config` (see `avsbench_config`) and load a released AVSBench checkpoint into it.

    Returns the model (in eval mode, on the CPU) and the config it was built from. A checkpoint that does not fit
    (another backbone, width or set of TPAVI stages) is an InputError naming the file and the keys. To run it with
    the config's device, precision and memory format, use `avstrain.runtime.load_for_inference(path,
    checkpoint_format="avsbench", config=config)`.
    """
    config = avsbench_config(config)
    state = read_avsbench_state(path)
    model = build_model(config.model)
    try:
        load_avsbench_checkpoint(model, state)
    except AVSBenchCheckpointError as error:
        raise InputError(path, str(error)) from None
    log.info("loaded AVSBench checkpoint %s (%s, C=%d, TPAVI stages %s)", path, config.model.backbone,
             config.model.channels, list(config.model.tpavi_stages))
    return model.eval(), config


def convert_avsbench_checkpoint(source: str | Path, target: str | Path, config: Config) -> dict:
    """Write a released AVSBench checkpoint as an avs-toolkit checkpoint (the format `avstrain train` writes, loadable
    with `weights_only=True` by `avstrain eval`/`predict`). Returns what was written (without the tensors)."""
    model, config = load_avsbench_model(source, config)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    state = make_checkpoint(model, config, classes=[], converted_from=f"AVSBench checkpoint {Path(source).name}")
    save_atomic(state, target)
    return metadata(state)
