"""What the sound-source localisation and correspondence models (`senocak`, `avenet`, `avolnet`; docs/design.md
§13) share: the visual trunk, a backbone cut after one stage and fed a clip's frames one by one, and the base of
their registered kinds (negative audio picked in the batch, the localisation suite).

Senocak's attention and AVOL-Net's per-cell scores read a spatial map, which AVE-Net max-pools
(`model.feature_stage`, stride 8 by default: 8×8 cells at the 64-px CPU size, where a 4×4 grid at stride 16 would
cap the pointing game near 0.89 even for a perfect localiser). The stages after the one read are dropped, so they
cost nothing and hold no parameter that never gets a gradient. With ImageNet weights the trunk may be frozen, as
Senocak et al. froze VGG16.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ..config import Config, ConfigError, LossConfig, ModelConfig
from ..localisation_losses import correspondence_loss, negative_audio, pick_negatives
from ..losses import LossOutput
from .backbones import build_backbone
from .registry import ModelKind
from .tpavi_avs import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)


class FrameEncoder(nn.Module):
    """Backbone up to stage `stage` (0..3, stride 4·2^stage). ``forward(frames [B,T,3,H,W]) -> [B·T, C, h, w]``."""

    def __init__(self, backbone: str, weights: str | None = None, stage: int = 1, freeze: bool = False) -> None:
        super().__init__()
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"the feature stage must be in 0..3, got {stage}")
        self.backbone = build_backbone(backbone, weights)
        self.backbone.keep_stages(stage)
        self.stage = stage
        self.channels = self.backbone.channels[stage]
        self.stride = self.backbone.strides[stage]
        self.frozen = freeze
        if freeze:
            self.backbone.requires_grad_(False)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> FrameEncoder:
        super().train(mode)
        if self.frozen:  # frozen means frozen batch statistics too
            self.backbone.eval()
        return self

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [N,3,H,W] in 0..255 or float in 0..1 -> ImageNet-normalised float."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    def encode_images(self, images: Tensor) -> Tensor:
        """images [N,3,H,W] -> the stage map [N, C, H/stride, W/stride]."""
        return self.backbone(self.normalize(images))[self.stage]

    def forward(self, frames: Tensor) -> Tensor:
        return self.encode_images(frames.flatten(0, 1))  # [B·T, C, h, w]


class PairedAudioKind(ModelKind):
    """Base of the kinds trained with negative audio: each clip of a batch is paired with another clip of the batch
    whose class is not visible in it (`pick_negatives`), second t with second t."""

    options = ("backbone", "backbone_weights", "image_size", "audio", "audio_dim", "feature_stage",
               "freeze_backbone", "embed_dim")
    def network(self, visual: FrameEncoder, config: ModelConfig) -> nn.Module:
        """The kind's network around its visual trunk."""
        raise NotImplementedError

    def build(self, config: ModelConfig) -> nn.Module:
        stage = config.feature_stage
        visual = FrameEncoder(config.backbone, config.backbone_weights, stage, config.freeze_backbone)
        model = self.network(visual, config)
        model.config = config  # as AVSModel keeps it: the commands read kind, image_size and audio from it
        log.info("built %s: %s stage %d (stride %d)%s, %.1fM parameters%s", self.name, config.backbone, stage,
                 visual.stride, ", frozen" if config.freeze_backbone else "",
                 sum(p.numel() for p in model.parameters()) / 1e6, "" if config.audio else ", deaf (constant audio)")
        return model

    def for_shards(self, config: Config, manifest: dict) -> ModelConfig:
        """Checks what training needs: some loss on, and classes (the negatives are clips of a class not in view)."""
        if not any(getattr(config.loss, name) for name in self.losses):
            raise ConfigError(f"model.kind = {self.name!r} needs one of loss.{', loss.'.join(self.losses)} > 0")
        if not manifest["classes"]:
            raise ConfigError(f"model.kind = {self.name!r} picks negatives by class, and these shards have none")
        return config.model

    def batch_fields(self, config: Config) -> tuple[str, ...]:
        return "frames", "audio", "label", "other_label", "sounding"

    def forward(self, network: nn.Module, batch: dict):
        negatives = pick_negatives(batch["label"], batch.get("other_label"), batch["sounding"])
        output = network(batch["frames"], batch["audio"], negative_audio(batch["audio"], negatives))
        output.negative_valid = negatives >= 0  # [B]: clips that found a negative in the batch
        return output

    def suites(self) -> dict:
        from avstrain.localisation import localisation_suite  # the suite loads checkpoints: runtime -> models

        return {"default": localisation_suite, "localisation": localisation_suite}


class CorrespondenceKind(PairedAudioKind):
    """Base of the kinds trained by audio-visual correspondence alone (AVE-Net, AVOL-Net): `loss.avc`."""

    losses = {"avc": 1.0}

    def compute_loss(self, output, batch: dict, config: LossConfig) -> LossOutput:
        return correspondence_loss(output, config)


__all__ = ["CorrespondenceKind", "FrameEncoder", "PairedAudioKind"]
