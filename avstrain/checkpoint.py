"""The avs-toolkit checkpoint: what it holds, how it is written, read and turned back into a model.

A checkpoint is a dict of tensors and plain values, so it loads with `torch.load(..., weights_only=True)` (nothing
else is ever unpickled). Its keys, all defined here:

| key | what |
|---|---|
| `format` | `"avs-toolkit checkpoint v1"` |
| `model` | the model's state dict |
| `config` | the resolved config, a nested dict (`config_to_dict`) |
| `classes` | the training shards' class names (they size a crop classifier) |
| `mask_classes` | classes of the mask head as the shards sized it (1: binary; absent in older checkpoints) |
| `embedder`, `frames_per_clip` | the shards' audio embedder and T: `predict --video` embeds a user's audio alike |
| `epoch`, `step`, `batch_in_epoch`, `best_miou` | where the run stood (`RunState`; 0, 0, 0, -1 when converted) |
| `heard_epoch` | the epoch after which validation found the model hearing (`train.negatives_start = "hears"`; -1: not yet) |
| `optimizer`, `rng` | training checkpoints only: what `--resume` restores besides the model |
| `converted_from` | checkpoints converted from a released AVSBench file only |

Files are written atomically (a `.partial` file, then a rename), so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from avsprep.errors import InputError
from avstrain.config import Config, build_config, config_to_dict
from avstrain.models import build_for_shards

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "avs-toolkit checkpoint v1"
# The tensors of a checkpoint; everything else is small metadata (`metadata`).
TENSOR_KEYS = ("model", "optimizer", "rng", "rank_rngs")


@dataclass
class RunState:
    """Where a training run stands: what changes step by step, and what a checkpoint restores on `--resume`."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0  # the data position: batches of this epoch already trained on
    best_metric: float = -1.0  # best validation value of the model kind's metric (tpavi: mIoU)
    # The epoch count at the validation that first found the model hearing (-1: not yet); with
    # train.negatives_start = "hears", negative audio starts with the next epoch.
    heard_epoch: int = -1
    # Draws of negative audio; seeded per rank by the trainer, so that ranks draw differently.
    negatives: torch.Generator = field(default_factory=torch.Generator)


def make_checkpoint(model: nn.Module, config: Config, classes: list[str], *, run: RunState | None = None,
                    optimizer: torch.optim.Optimizer | None = None, embedder: str | None = None,
                    frames_per_clip: int | None = None, converted_from: str | None = None,
                    rank_rngs: list[dict] | None = None) -> dict:
    """The checkpoint dict (see the module docstring). `run` and `optimizer` make it a training checkpoint, with the
    RNG states that an exact resume needs."""
    run = run if run is not None else RunState()
    state = {
        "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": config_to_dict(config),
        "classes": list(classes), "embedder": embedder, "frames_per_clip": frames_per_clip,
        # The head as the shards sized it (`model.mask_classes = 0` in the config means: from the shards).
        "mask_classes": int(getattr(getattr(getattr(model, "module", model), "config", None), "mask_classes", 1)),
        "epoch": run.epoch, "step": run.step, "batch_in_epoch": run.batch_in_epoch, "best_miou": run.best_metric,
        "heard_epoch": run.heard_epoch,
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
        state["rng"] = _rng_state(run.negatives)
        if rank_rngs is not None:  # under DDP: every rank's RNGs (`rng` is rank 0's), for an exact resume
            state["rank_rngs"] = rank_rngs
    if converted_from is not None:
        state["converted_from"] = converted_from
    return state


def save_atomic(state: dict, path: str | Path) -> None:
    """torch.save to a temporary name beside `path`, then rename: readers see the old file or the whole new one."""
    path = Path(path)
    temporary = path.with_name(path.name + ".partial")
    torch.save(state, temporary)
    os.replace(temporary, path)


def read_state_dict_file(path: str | Path) -> object:
    """What a torch file holds, loaded weights-only; InputError naming the file when it is missing or unloadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for files that are not checkpoints
        first_line = (str(error).splitlines() or [type(error).__name__])[0]  # an empty file gives an empty message
        raise InputError(path, f"not a loadable checkpoint ({first_line[:200]})") from None


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by `avstrain train` (or converted); InputError naming the file for anything else."""
    state = read_state_dict_file(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(path, "not an avs-toolkit checkpoint (use --format avsbench for the reference's)")
    return state


def metadata(state: dict) -> dict:
    """A checkpoint's plain values (epoch, classes, embedder, ...), without its tensors."""
    return {key: value for key, value in state.items() if key not in TENSOR_KEYS}


def model_from_checkpoint(state: dict) -> tuple[nn.Module, Config]:
    """Rebuild the model a checkpoint was trained with and load its weights (the model is in training mode)."""
    config = build_config(state["config"])
    # Every tensor comes from the checkpoint: the ImageNet weight files it was trained from need not be at hand.
    no_weight_files = dataclasses.replace(config, model=dataclasses.replace(
        config.model, backbone_weights=None, crop_backbone_weights=None))
    model = build_for_shards(no_weight_files, {"classes": state["classes"],
                                               "mask_classes": state.get("mask_classes", 1)})
    model.load_state_dict(state["model"])
    return model, config


def restore(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, run: RunState) -> None:
    """Continue from a training checkpoint: weights, optimiser, run position and every RNG, in place."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    run.epoch, run.step, run.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
    run.best_metric = state["best_miou"]
    run.heard_epoch = int(state.get("heard_epoch", -1))  # absent in checkpoints written before the option
    rank_rngs = state.get("rank_rngs") or [state["rng"]]
    rank = _rank()
    if rank >= len(rank_rngs):
        log.warning("checkpoint holds the RNGs of %d ranks: rank %d starts from rank 0's", len(rank_rngs), rank)
    _restore_rng(rank_rngs[rank] if rank < len(rank_rngs) else state["rng"], run.negatives)


def _rank() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


def _every_rank_rng(negatives: torch.Generator) -> list[dict] | None:
    """Every rank's RNG states, rank by rank (a collective: every rank calls it); None without DDP."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_world_size() == 1:
        return None
    states: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, _rng_state(negatives))
    return states


class CheckpointSaver:
    """Writes a run's checkpoints, in the manner of timm's saver: `last.pt`, `best.pt` and `step-<n>.pt`.

    Under torch.distributed only rank 0 writes (`enabled=False` elsewhere); every rank holds the same weights.
    """

    def __init__(self, run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: Config,
                 manifest: dict, enabled: bool = True):
        self.run_dir, self.model, self.optimizer, self.config = Path(run_dir), model, optimizer, config
        self.manifest, self.enabled = manifest, enabled

    @property
    def last(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.run_dir / "best.pt"

    def save(self, path: Path, run: RunState, every_rank: bool = True) -> None:
        """`every_rank`: called by every rank at the same point (last.pt, step-<n>.pt), which gathers each rank's
        RNGs into the checkpoint; best.pt is saved by rank 0 alone and holds only its own."""
        rank_rngs = _every_rank_rng(run.negatives) if every_rank else None
        if not self.enabled:
            return
        save_atomic(make_checkpoint(
            self.model, self.config, self.manifest["classes"], run=run, optimizer=self.optimizer,
            # The audio embedder of the training shards: `avstrain predict --video` must embed a user's audio alike.
            embedder=self.manifest.get("embedder"), frames_per_clip=self.manifest.get("frames_per_clip"),
            rank_rngs=rank_rngs), path)

    def save_last(self, run: RunState) -> None:
        self.save(self.last, run)

    def save_best(self, run: RunState) -> None:
        self.save(self.best, run, every_rank=False)

    def save_step(self, run: RunState) -> None:
        """`step-<n>.pt`, and `last.pt` with it."""
        self.save(self.run_dir / f"step-{run.step}.pt", run)
        self.save_last(run)


def _rng_state(negatives: torch.Generator) -> dict:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "negatives": negatives.get_state(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
        "python": random.getstate(),
    }


def _restore_rng(state: dict, negatives: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    negatives.set_state(state["negatives"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss = state["python"]  # weights-only loading gives lists where random wants tuples
    random.setstate((version, tuple(internal), gauss))


__all__ = ["CHECKPOINT_FORMAT", "CheckpointSaver", "RunState", "load_checkpoint", "make_checkpoint", "metadata",
           "model_from_checkpoint", "read_state_dict_file", "restore", "save_atomic"]
