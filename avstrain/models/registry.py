"""The model registry, in the manner of timm: each model family registers a `ModelKind` under the name that
`model.kind` selects (`@register_model("tpavi")`), and the training loop and the commands ask the kind, never the
model's class, what they need of it.

A kind says which `model.*` options it reads, which losses it trains with (and their default weights), what a
training batch must hold, how a batch goes through the network and into the loss, which validation metric chooses
`best.pt`, and which evaluation suites it has. A new family (localisation, correspondence, a semantic head) is one
new file in `avstrain/models/` with one registered kind: the loop does not change.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from avstrain.config import LOSS_WEIGHTS, Config, ConfigError, ModelConfig

if TYPE_CHECKING:
    from avstrain.config import LossConfig
    from avstrain.losses import LossOutput


class ModelKind:
    """What the loop needs of one model family. Subclass it and register the subclass with `register_model`."""

    name: str = ""
    # The `model.*` fields this kind reads (besides `kind`); setting another one explicitly is a ConfigError.
    options: tuple[str, ...] = ()
    # loss name (a `loss.*` weight) -> its default weight; a weight the kind does not use must stay 0.
    losses: Mapping[str, float] = {}
    # Dotted path into the default suite's result; `best.pt` is the epoch where it is highest.
    best_metric: str = ""

    def build(self, config: ModelConfig) -> nn.Module:
        """The model of `config` (local weight files loaded where the config names them)."""
        raise NotImplementedError

    def for_shards(self, config: Config, manifest: dict) -> ModelConfig:
        """The model options as the training shards fix them (e.g. the number of classes)."""
        return config.model

    def prepare(self, model: nn.Module, config: Config, shards_dir: Path) -> None:
        """Before the first step of a fresh run: what the model measures from the training split itself (TPAVI:
        the audio statistics of `model.audio_norm`). A resumed run loads it from the checkpoint instead."""

    def batch_fields(self, config: Config) -> tuple[str, ...]:
        """The shard fields a training batch must hold on the device."""
        raise NotImplementedError

    def forward(self, network: nn.Module, batch: dict) -> Any:
        """The network's output for a device batch (`network` may be a DistributedDataParallel wrapper)."""
        raise NotImplementedError

    def compute_loss(self, output: Any, batch: dict, config: LossConfig) -> LossOutput:
        """The weighted total and the unweighted parts of the kind's losses."""
        raise NotImplementedError

    def find_unused_parameters(self, config: Config) -> bool:
        """Whether some parameters get no gradient in a training step (DistributedDataParallel must then look)."""
        return False

    def suites(self) -> dict[str, Callable[..., dict]]:
        """Evaluation suites by name, called as `suite(model, shards_dir, split, device, amp_dtype, batch_size=...,
        num_workers=..., max_clips=...)`; "default" is what validation runs every epoch."""
        raise NotImplementedError


_KINDS: dict[str, ModelKind] = {}


def register_model(name: str) -> Callable[[type[ModelKind]], type[ModelKind]]:
    """Class decorator: register a `ModelKind` subclass under `name` (the value of `model.kind`)."""

    def register(cls: type[ModelKind]) -> type[ModelKind]:
        if name in _KINDS:
            raise ValueError(f"model kind {name!r} is registered twice")
        cls.name = name
        _KINDS[name] = cls()
        return cls

    return register


def registered_kinds() -> list[str]:
    return sorted(_KINDS)


def get_kind(name: str) -> ModelKind:
    """The registered kind; ConfigError listing the registered ones for any other name."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ConfigError(f"model.kind must be one of {', '.join(registered_kinds())}, got {name!r}") from None


def build_model(config: ModelConfig) -> nn.Module:
    """Build the model of `config.kind` (default "tpavi")."""
    return get_kind(config.kind).build(config)


def build_for_shards(config: Config, manifest: dict) -> nn.Module:
    """The model of `config`, with what the training shards fix (their class map) filled in."""
    kind = get_kind(config.model.kind)
    return kind.build(kind.for_shards(config, manifest))


def resolve_kind_settings(config: Config, explicit: Mapping[str, Mapping[str, object]]) -> Config:
    """`config` with the loss weights its kind gives by default; ConfigError for what the kind does not use.

    `explicit` holds the {section: {key: value}} the user set (config file and overrides): a loss weight the kind
    does not use is an error only when set explicitly to non-zero, a model option it does not read only when set to
    other than its default (a resolved config, as checkpoints and config.toml hold it, lists every field).
    """
    kind = get_kind(config.model.kind)
    defaults = ModelConfig()
    unread = sorted(key for key in set(explicit.get("model", {})) - set(kind.options) - {"kind"}
                    if getattr(config.model, key) != getattr(defaults, key))
    if unread:
        raise ConfigError(f"model.kind = {kind.name!r} does not read model.{', model.'.join(unread)}")
    given = explicit.get("loss", {})
    weights = {}
    for name in LOSS_WEIGHTS:
        if name in kind.losses:
            weights[name] = float(given[name]) if name in given else kind.losses[name]
        elif given.get(name, 0):
            raise ConfigError(f"loss.{name} does not apply to model.kind = {kind.name!r}, which trains with "
                              f"loss.{', loss.'.join(kind.losses)}")
        else:
            weights[name] = 0.0
    return dataclasses.replace(config, loss=dataclasses.replace(config.loss, **weights))

__all__ = ["ModelKind", "build_for_shards", "build_model", "get_kind", "register_model", "registered_kinds",
           "resolve_kind_settings"]
