"""Where and how a model runs: device, precision (bf16 autocast or fp32), memory format, eval mode, and one way to
load a checkpoint for inference.

Training and every inference command (`avstrain eval`, `predict`, overlays, video, `avsprep tsne`, the ablation)
go through these functions, so a checkpoint is evaluated with the precision and memory format it trained with:
`train.amp` picks the autocast dtype for the device (`resolve_amp`), `train.channels_last` the layout of the 2-D
convolutions.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from avstrain.avsbench import load_avsbench_model
from avstrain.checkpoint import load_checkpoint, metadata, model_from_checkpoint
from avstrain.config import Config

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def training_device() -> torch.device:
    """This process's device for training: under torchrun the GPU of its LOCAL_RANK (made current), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run natively (about 3x fp32 for ResNet-50 fwd+bwd on these machines)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch without the probes
        return False


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.amp` ("auto", "bf16", "fp32") on this device, or None for fp32."""
    if amp == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if cpu_has_native_bf16():
        # "auto" too: on the synthetic benchmark bf16 matched fp32 (test mIoU 0.873 vs 0.876) at 1.45x the speed.
        return torch.bfloat16
    if amp == "bf16":
        log.warning("train.amp = bf16 but this CPU has no native bf16 (AMX / AVX512-BF16): running fp32")
    return None


def to_channels_last(model: nn.Module) -> None:
    """channels-last for the 2-D convolutions (TPAVI's Conv3d weights are 5-D and stay as they are)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.to(memory_format=torch.channels_last)


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 (or other) autocast on the device, or nothing for fp32."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluation mode for the block, then back to the mode the caller had (the trainer validates mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class Runtime:
    """How a loaded model runs: its device, autocast dtype (None: fp32) and memory format, and what the checkpoint
    says besides its tensors (`epoch`, `step`, `classes`, `embedder`, `frames_per_clip`, ...; empty for a released
    AVSBench file)."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    checkpoint: dict = field(default_factory=dict)

    @classmethod
    def for_config(cls, config: Config, device: torch.device | str | None = None, checkpoint: dict | None = None
                   ) -> Runtime:
        """The runtime a config asks for (`train.amp`, `train.channels_last`) on `device` (default: GPU, else CPU)."""
        device = torch.device(device) if device is not None else default_device()
        return cls(device, resolve_amp(config.train.amp, device), config.train.channels_last, checkpoint or {})

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model on this device, in this memory format."""
        model.to(self.device)
        if self.channels_last:  # as the model trained: about 20 % faster in bf16 on these CPUs
            to_channels_last(model)
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp_dtype)

    def describe(self) -> str:
        precision = f"{str(self.amp_dtype).removeprefix('torch.')} autocast" if self.amp_dtype else "fp32"
        return f"{self.device}, {precision}" + (", channels-last" if self.channels_last else "")


def load_for_inference(checkpoint: str | Path, device: torch.device | str | None = None,
                       checkpoint_format: str = "avs-toolkit", config: Config | None = None
                       ) -> tuple[nn.Module, Config, Runtime]:
    """Load a checkpoint and make its model ready to run: (model in eval mode on the device, its config, Runtime).

    `checkpoint_format="avs-toolkit"` reads what `avstrain train` writes (the config comes from the file);
    `"avsbench"` reads a released AVSBench state dict into the model of `config` (see `avstrain.avsbench`).
    Precision and memory format follow the config's `train.amp` and `train.channels_last`.
    """
    if checkpoint_format == "avsbench":
        model, config = load_avsbench_model(checkpoint, config if config is not None else Config())
        state: dict = {}
    else:
        state = load_checkpoint(checkpoint)
        model, config = model_from_checkpoint(state)
    runtime = Runtime.for_config(config, device, metadata(state))
    runtime.prepare(model).eval()
    log.info("loaded %s for inference: %s", checkpoint, runtime.describe())
    return model, config, runtime


__all__ = ["Runtime", "autocast", "cpu_has_native_bf16", "default_device", "eval_mode", "load_for_inference",
           "resolve_amp", "to_channels_last", "training_device"]
