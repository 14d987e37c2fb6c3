"""Typed configuration of the trainer (docs/design.md §12), nanoGPT-style: plain dataclass fields, one per knob.

One dataclass per section (`data`, `model`, `loss`, `optim`, `train`, `eval`); defaults are the AVSBench S4 recipe
(ResNet-50, C=256, 224 px, TPAVI at all four stages, mask BCE only, Adam 1e-4, batch 4, 15 epochs). A TOML file in
`configs/` fills them in and `--set section.key=value` overrides any field; unknown sections or keys are errors.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from avsprep.embedding import EMBEDDING_DIM

BACKBONES = ("resnet18", "resnet34", "resnet50", "pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b3", "pvt_v2_b4",
             "pvt_v2_b5")
CROP_MODES = ("off", "separate", "shared")
AVM_VARIANTS = ("kl", "cosine", "kl_semantic")
# The weighted parts of the loss; a model kind (`avstrain.models.registry`) says which it trains with.
LOSS_WEIGHTS = ("bce", "ce", "dice", "av", "avm", "crop_cls", "crop_temporal", "crop_audio", "senocak_unsup",
                "senocak_sup", "avc")
# When negative audio may start (`train.negatives_start`).
NEGATIVES_STARTS = ("epoch", "hears")


@dataclass
class ModelConfig:
    """The model: its kind (the registered family, `avstrain.models.registry`) and that kind's options. Today the
    one kind is "tpavi", the TPAVI AVS model (docs/design.md §6) with its optional crop encoder (docs/design.md §7)."""

    kind: str = "tpavi"
    backbone: str = "resnet50"
    # Local torchvision-format state dict with ImageNet weights; None = random init. Nothing is ever downloaded.
    backbone_weights: str | None = None
    channels: int = 256
    image_size: int = 224
    tpavi_stages: tuple[int, ...] = (0, 1, 2, 3)
    # False builds the vision-only model: same code path, no TPAVI blocks, audio ignored.
    audio: bool = True
    audio_dim: int = EMBEDDING_DIM
    # "off": no crop encoder; "separate": own ResNet trunk (the seed project); "shared": crops go through `backbone`.
    crop_mode: str = "off"
    crop_backbone: str = "resnet18"
    crop_backbone_weights: str | None = None
    crop_embed_dim: int = 512
    # Classes of the crop classifier; 0 builds no classifier (the trainer sets it from the shard manifest).
    num_classes: int = 0
    # Mask classes of the head (docs/design.md §14): 1 the binary S4/MS3 head; K >= 2 a K-class semantic head, class 0
    # background (AVSS: 71); 0 takes K from the shards' manifest.
    mask_classes: int = 1
    # TPAVI's audio projection (`align_channel`) has a bias in the S4/MS3 reference and none in AVSS: the model is
    # built before any state dict is read, so the checkpoint layout must be in the config.
    audio_proj_bias: bool = True
    # Frames per TPAVI window (None: all T frames of the clip); the AVSS reference hard-codes 5, so its 10-frame
    # clips are two independent 5-frame windows.
    tpavi_window: int | None = None
    # The localisation and correspondence kinds (senocak, avenet, avolnet; docs/design.md §13): the backbone stage they read
    # (0..3, stride 4·2^k; 1 = stride 8, 8×8 cells at 64 px, where a 4×4 grid would cap the pointing game near
    # 0.89), a frozen backbone (only with backbone_weights, as Senocak et al. froze VGG16), their embedding width.
    feature_stage: int = 1
    freeze_backbone: bool = False
    embed_dim: int = 128
    # Training TPAVI from scratch (docs/design.md §17; not in the AVSBench recipes). The initial weight of TPAVI's
    # output BatchNorm: 0 (the reference) makes a fresh block the identity, and its θ, φ, g and audio projection get
    # no gradient until that weight has moved; 1 lets the interaction train from the first step.
    tpavi_bn_init: float = 0.0
    # Standardise the audio embeddings per dimension with the training split's mean and std (the trainer measures
    # them; they travel in the state dict) before the model uses them. False: the raw embeddings (the reference).
    audio_norm: bool = False
    # With audio_norm: squash the standardised audio smoothly into ±audio_clip (c·tanh(z/c); 0: off). Silence and
    # noise embeddings sit 4–8 standard deviations from the training audio (absmax 16), far outside what the clips
    # teach the audio projection; squashed, negative audio stays distinct without swamping TPAVI (docs/design.md §17).
    audio_clip: float = 0.0

    def __post_init__(self) -> None:
        self.tpavi_stages = tuple(int(s) for s in self.tpavi_stages)
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.audio_clip < 0 or (self.audio_clip and not self.audio_norm):
            raise ValueError(f"model.audio_clip needs model.audio_norm = true and a value > 0 (0: off), "
                             f"got {self.audio_clip}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"model.crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if self.crop_mode == "separate" and self.crop_backbone not in BACKBONES:
            raise ValueError(f"model.crop_backbone must be one of {BACKBONES}, got {self.crop_backbone!r}")
        if any(s not in (0, 1, 2, 3) for s in self.tpavi_stages) or len(set(self.tpavi_stages)) != len(
                self.tpavi_stages):
            raise ValueError(f"model.tpavi_stages must be distinct stages in 0..3, got {self.tpavi_stages}")
        if self.channels < 2 or self.channels % 2:
            raise ValueError(f"model.channels must be even and >= 2 (TPAVI uses C/2), got {self.channels}")
        if self.image_size % 32:
            raise ValueError(f"model.image_size must be a multiple of 32 (stride of the last stage), "
                             f"got {self.image_size}")
        if self.num_classes < 0:
            raise ValueError(f"model.num_classes must be >= 0, got {self.num_classes}")
        if self.mask_classes < 0:
            raise ValueError(f"model.mask_classes must be >= 0 (0: from the shards), got {self.mask_classes}")
        if self.tpavi_window is not None and self.tpavi_window < 1:
            raise ValueError(f"model.tpavi_window must be >= 1 frame, got {self.tpavi_window}")
        if self.feature_stage not in (0, 1, 2, 3):
            raise ValueError(f"model.feature_stage must be a stage in 0..3, got {self.feature_stage}")
        if self.freeze_backbone and not self.backbone_weights:
            raise ValueError("model.freeze_backbone needs model.backbone_weights: a frozen random backbone learns "
                             "nothing")
        if self.embed_dim < 1:
            raise ValueError(f"model.embed_dim must be >= 1, got {self.embed_dim}")


@dataclass
class LossConfig:
    """Loss weights (docs/design.md §7); a weight of 0 switches that part off (it is then not computed at all).

    The defaults here are the "tpavi" kind's; `build_config` takes each kind's own defaults from its registry entry.
    """

    bce: float = 1.0
    # K-class cross-entropy of the semantic head (AVSS, docs/design.md §14), averaged over pixels, then labelled frames.
    ce: float = 0.0
    # The AVSBench MS3 recipe uses avm = 0.5 with the KL form; the S4 recipe (the default here) uses none.
    avm: float = 0.0
    avm_variant: str = "kl"
    avm_stages: tuple[int, ...] = (0, 1, 2, 3)
    # L2-normalise v and a before the KL of AVM. The reference MS3 and AVSS recipes do not (docs/design.md §7, §14).
    avm_normalise: bool = False
    crop_cls: float = 0.0
    crop_temporal: float = 0.0
    crop_audio: float = 0.0
    # Senocak et al. (docs/design.md §13): the weights of the unsupervised L_U and of the supervised L_S (λ), and the
    # fraction of training clips that keep their ground truth (0: unsupervised, 1: every clip), picked by a hash of
    # (supervised_seed, clip name), so the same clips in every epoch and run.
    senocak_unsup: float = 0.0
    senocak_sup: float = 0.0
    supervised_fraction: float = 1.0
    supervised_seed: int = 0
    # Audio-visual correspondence (AVE-Net, AVOL-Net).
    avc: float = 0.0
    # Training TPAVI from scratch (docs/design.md §17; not in the AVSBench recipes): a soft Dice term on the mask,
    # per supervised frame, and a BCE of TPAVI's localisation scores θ_i·φ_t at stage `av_stage` against the mask
    # pooled to that stage (a direct audio-visual signal); `pos_weight` weights the positive pixels of the mask BCE.
    dice: float = 0.0
    av: float = 0.0
    av_stage: int = 0
    pos_weight: float = 1.0

    def __post_init__(self) -> None:
        self.avm_stages = tuple(int(s) for s in self.avm_stages)
        if self.avm_variant not in AVM_VARIANTS:
            raise ValueError(f"loss.avm_variant must be one of {AVM_VARIANTS}, got {self.avm_variant!r}")
        for name in LOSS_WEIGHTS:
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.avm > 0 and not self.avm_stages:
            raise ValueError("loss.avm > 0 needs at least one stage in loss.avm_stages")
        if not 0 <= self.supervised_fraction <= 1:
            raise ValueError(f"loss.supervised_fraction is a fraction in [0, 1], got {self.supervised_fraction}")
        if self.av_stage not in (0, 1, 2, 3):
            raise ValueError(f"loss.av_stage must be a stage in 0..3, got {self.av_stage}")
        if self.pos_weight <= 0:
            raise ValueError(f"loss.pos_weight must be > 0, got {self.pos_weight}")


@dataclass
class DataConfig:
    """Which splits to read and how to augment training clips."""

    train_split: str = "train"
    val_split: str = "val"
    buffer_size: int = 256  # shuffle buffer per DataLoader worker
    augment: bool = True
    flip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 4
    epochs: int = 15
    lr_schedule: str = "constant"  # "constant" (the reference) or "cosine" (decays to 0 over the run)
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max gradient norm; 0: off


@dataclass
class TrainConfig:
    seed: int = 0
    workers: int = 2  # DataLoader workers
    # Negative audio (docs/design.md §7): probability that a training clip's audio is replaced by silence, noise or an
    # off-screen class, with an empty target.
    negatives: float = 0.0
    negative_kinds: tuple[str, ...] = ("silence", "noise", "offscreen")
    # Start negatives at this epoch: from scratch, the model first has to learn to find the sounding object at all.
    negatives_from_epoch: int = 0
    # "epoch": negatives from `negatives_from_epoch` on. "hears": besides, only after a validation has found that the
    # model hears (val mIoU with the clip's own audio at least `hears_margin` above that with the other visible
    # object's audio, both against the clip's mask; `evaluate.hearing`). Negatives drawn on a deaf model only teach
    # it to predict nothing (docs/design.md §17). The epoch it heard is part of the checkpoint.
    negatives_start: str = "epoch"
    hears_margin: float = 0.1
    # Steps over which the share of negative clips rises linearly from 0 to `negatives` once they start (0: at once).
    negatives_ramp: int = 0
    # Audio swap (docs/design.md §17): probability that a training clip with another visible object gets that object's
    # sound (a batch clip where its class sounds alone) and its mask as the target, from the first step on.
    swap: float = 0.0
    amp: str = "auto"  # "auto"/"bf16": bf16 autocast on CUDA and on CPUs with native bf16, else fp32; "fp32"
    channels_last: bool = True
    checkpoint_every: int = 0  # also save step-<n>.pt every n steps; 0: only last.pt and best.pt
    max_steps: int = 0  # stop after this many steps in total (smoke runs); 0: run every epoch
    threads: int = 0  # torch intra-op threads; 0: torch's default

    def __post_init__(self) -> None:
        self.negative_kinds = tuple(self.negative_kinds)
        unknown = set(self.negative_kinds) - {"silence", "noise", "offscreen"}
        if unknown:
            raise ValueError(f"train.negative_kinds: unknown kinds {sorted(unknown)}")
        if self.amp not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.amp must be auto, bf16 or fp32, got {self.amp!r}")
        if not 0 <= self.negatives <= 1:
            raise ValueError(f"train.negatives is a probability, got {self.negatives}")
        if self.negatives_ramp < 0:
            raise ValueError(f"train.negatives_ramp is a number of steps, got {self.negatives_ramp}")
        if not 0 <= self.swap <= 1:
            raise ValueError(f"train.swap is a probability, got {self.swap}")
        if self.negatives_start not in NEGATIVES_STARTS:
            raise ValueError(f"train.negatives_start must be one of {NEGATIVES_STARTS}, got {self.negatives_start!r}")
        if not 0 < self.hears_margin <= 1:
            raise ValueError(f"train.hears_margin is an mIoU difference in (0, 1], got {self.hears_margin}")


@dataclass
class EvalConfig:
    batch_size: int = 4  # the reference tests with batches of 4 clips (f_avsbench depends on it)
    every: int = 1  # validate every n epochs
    max_clips: int = 0  # validate on at most this many clips; 0: the whole split
    # Also log at each validation whether the model hears (`evaluate.hearing`); "hears" schedules log it anyway.
    hearing: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses (unknown key, wrong type)."""


def _coerce(section: str, key: str, hint, value):
    """A TOML value as the field's type: ints become floats, lists tuples; anything else must already fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _coerce(section, key, inner, value)
    expected = origin or hint
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise ConfigError(f"{section}.{key} must be {getattr(expected, '__name__', expected)}, got {value!r}")
    return value


def build_config(sections: dict) -> Config:
    """Config from a {section: {key: value}} mapping; unknown sections or keys and wrong types are ConfigErrors.

    The model kind (`model.kind`) gives the loss weights left unset; setting one it does not use to non-zero, or a
    model option it does not read, is a ConfigError, as is an unknown kind.
    """
    from avstrain.models.registry import resolve_kind_settings  # the registry imports this module

    built = {}
    for section_field in dataclasses.fields(Config):
        cls = section_field.type if isinstance(section_field.type, type) else globals()[section_field.type]
        hints = typing.get_type_hints(cls)
        values = dict(sections.get(section_field.name, {}))
        unknown = set(values) - set(hints)
        if unknown:
            raise ConfigError(f"unknown key(s) in [{section_field.name}]: {', '.join(sorted(unknown))}")
        try:
            built[section_field.name] = cls(**{k: _coerce(section_field.name, k, hints[k], v) for k, v in values.items()})
        except ValueError as error:
            raise ConfigError(str(error)) from None
    unknown_sections = set(sections) - set(built)
    if unknown_sections:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown_sections))}")
    return resolve_kind_settings(Config(**built), sections)


def parse_override(text: str) -> tuple[str, str, object]:
    """`section.key=value` -> (section, key, value); the value is a TOML literal, or a plain string if it is not one."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a TOML config (or start from the defaults) and apply `section.key=value` overrides."""
    sections: dict[str, dict] = {}
    if path is not None:
        try:
            sections = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"{path}: {error}") from None
    for text in overrides:
        section, key, value = parse_override(text)
        sections.setdefault(section, {})[key] = value
    return build_config(sections)


def config_to_dict(config: Config) -> dict:
    """Plain nested dict (tuples as lists) for checkpoints and TOML."""
    def plain(value):
        return list(value) if isinstance(value, tuple) else value
    return {name: {k: plain(v) for k, v in section.items()} for name, section in dataclasses.asdict(config).items()}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def config_to_toml(config: Config) -> str:
    """The resolved config as TOML (fields that are None are left out: None is their default)."""
    lines = []
    for section, values in config_to_dict(config).items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
        lines.append("")
    return "\n".join(lines)


__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "LossConfig", "OptimConfig", "TrainConfig",
           "EvalConfig", "load_config", "build_config", "parse_override", "config_to_dict", "config_to_toml",
           "BACKBONES", "CROP_MODES", "AVM_VARIANTS", "LOSS_WEIGHTS"]
