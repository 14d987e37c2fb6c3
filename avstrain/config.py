"""Typed configuration sections of the trainer (DESIGN §12).

One plain dataclass per section; defaults are the AVSBench recipe (ResNet-50, C=256, 224 px, TPAVI at all four
stages, mask BCE only). TOML files and ``--set section.key=value`` overrides fill these in; unknown keys are an
error at that level, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKBONES = ("resnet18", "resnet34", "resnet50", "pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b3", "pvt_v2_b4",
             "pvt_v2_b5")
CROP_MODES = ("off", "separate", "shared")
AVM_VARIANTS = ("kl", "cosine")


@dataclass
class ModelConfig:
    """The TPAVI AVS model (DESIGN §6) and its optional crop encoder (DESIGN §7)."""

    backbone: str = "resnet50"
    # Local torchvision-format state dict with ImageNet weights; None = random init. Nothing is ever downloaded.
    backbone_weights: str | None = None
    channels: int = 256
    image_size: int = 224
    tpavi_stages: tuple[int, ...] = (0, 1, 2, 3)
    # False builds the vision-only model: same code path, no TPAVI blocks, audio ignored.
    audio: bool = True
    audio_dim: int = 128
    # "off": no crop encoder; "separate": own ResNet trunk (the seed project); "shared": crops go through `backbone`.
    crop_mode: str = "off"
    crop_backbone: str = "resnet18"
    crop_backbone_weights: str | None = None
    crop_embed_dim: int = 512
    # Classes of the crop classifier; 0 builds no classifier (the trainer sets it from the shard manifest).
    num_classes: int = 0

    def __post_init__(self) -> None:
        self.tpavi_stages = tuple(int(s) for s in self.tpavi_stages)
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone must be one of {BACKBONES}, got {self.backbone!r}")
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


@dataclass
class LossConfig:
    """Loss weights (DESIGN §7); a weight of 0 switches that part off (it is then not computed at all)."""

    bce: float = 1.0
    # The AVSBench MS3 recipe uses avm = 0.5 with the KL form; the S4 recipe (the default here) uses none.
    avm: float = 0.0
    avm_variant: str = "kl"
    avm_stages: tuple[int, ...] = (0, 1, 2, 3)
    crop_cls: float = 0.0
    crop_temporal: float = 0.0
    crop_audio: float = 0.0

    def __post_init__(self) -> None:
        self.avm_stages = tuple(int(s) for s in self.avm_stages)
        if self.avm_variant not in AVM_VARIANTS:
            raise ValueError(f"loss.avm_variant must be one of {AVM_VARIANTS}, got {self.avm_variant!r}")
        for name in ("bce", "avm", "crop_cls", "crop_temporal", "crop_audio"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.avm > 0 and not self.avm_stages:
            raise ValueError("loss.avm > 0 needs at least one stage in loss.avm_stages")


__all__ = ["ModelConfig", "LossConfig", "BACKBONES", "CROP_MODES", "AVM_VARIANTS"]
