"""Senocak et al., CVPR 2018, "Learning to Localize Sound Source in Visual Scenes" (docs/design.md §13), registered
as ``model.kind = "senocak"``.

visual map v [C,h,w] (a backbone stage; stride 8 by default) and sound h = L2(FC(ReLU(FC(s)))) from the shard's
audio embedding s of the second; attention α = softmax over the h·w positions of ReLU(⟨v_ij/‖v_ij‖, h⟩);
z = Σ α_ij v_ij (v unnormalised); f_v = FC(ReLU(FC(ReLU(z)))) in the space of the raw audio embedding f_s, which the
unsupervised loss compares it with (as the paper compares f_v with the raw SoundNet feature, not with h).

Losses (`avstrain.localisation_losses`): L_U against the own and a negative clip's sound (`loss.senocak_unsup`),
L_S against the ground-truth map (`loss.senocak_sup`, applied to the clips that keep their ground truth,
`loss.supervised_fraction`). Departures: our backbones, trained from scratch (the paper froze an ImageNet VGG16;
`model.freeze_backbone` with `model.backbone_weights` does that), and the shard's 128-d embedding for SoundNet.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, LossConfig, ModelConfig
from ..localisation_losses import (ground_truth_attention, keeps_ground_truth, senocak_supervised_loss,
                                   senocak_unsupervised_loss)
from ..losses import LossOutput
from .localiser_base import FrameEncoder, PairedAudioKind
from .registry import register_model


@dataclass
class SenocakOutput:
    """What ``SenocakNet.forward`` returns; B clips of T frames, attention on the h×w grid of the feature stage."""

    heatmap: Tensor  # [B, T, h, w] attention α (sums to 1 over a frame's positions)
    log_attention: Tensor  # [B, T, h, w] log α, for the supervised loss
    visual: Tensor  # [B, T, D] f_v, in the space of the audio embedding
    sound: Tensor  # [B, T, D] f_s+: the audio the model heard (a constant for the deaf control)
    negative_sound: Tensor | None = None  # [B, T, D] f_s-: a negative clip's audio on the same grid
    negative_valid: Tensor | None = None  # [B] bool: clips that have a negative (set by the kind)


class SenocakNet(nn.Module):
    """``forward(frames [B,T,3,H,W], audio [B,T,D], negative_audio [B,T,D] or None) -> SenocakOutput``.

    ``hears=False`` builds the deaf control: every audio input is replaced by zeros, so the attention can only
    come from the frames.
    """

    def __init__(self, visual: FrameEncoder, audio_dim: int = 128, hears: bool = True) -> None:
        super().__init__()
        self.visual = visual
        channels = visual.channels
        self.hears = hears
        self.sound_branch = nn.Sequential(nn.Linear(audio_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        # f_v = FC(ReLU(FC(ReLU(z)))): the leading ReLU is part of the paper's formula.
        self.visual_head = nn.Sequential(nn.ReLU(), nn.Linear(channels, channels), nn.ReLU(),
                                         nn.Linear(channels, audio_dim))

    def _heard(self, audio: Tensor | None) -> Tensor | None:
        return audio if audio is None or self.hears else torch.zeros_like(audio)

    def attend(self, maps: Tensor, audio: Tensor) -> Tensor:
        """maps v [N,C,h,w], audio [N,D] -> log α [N,h,w] (in float32: a log-softmax over positions)."""
        sound = F.normalize(self.sound_branch(audio).float(), dim=-1)  # h [N, C]
        cosine = torch.einsum("nchw,nc->nhw", F.normalize(maps.float(), dim=1), sound)  # [N, h, w]
        scores = F.relu(cosine).flatten(1)  # [N, h·w]
        return scores.log_softmax(dim=1).view_as(cosine)

    def forward(self, frames: Tensor, audio: Tensor, negative_audio: Tensor | None = None) -> SenocakOutput:
        B, T = frames.shape[:2]
        audio, negative_audio = self._heard(audio), self._heard(negative_audio)
        maps = self.visual(frames)  # [B·T, C, h, w]
        log_attention = self.attend(maps, audio.flatten(0, 1))  # [B·T, h, w]
        attention = log_attention.exp()
        z = torch.einsum("nhw,nchw->nc", attention, maps.float())  # [B·T, C]
        visual = self.visual_head(z).view(B, T, -1)  # [B, T, D]
        h, w = attention.shape[-2:]
        return SenocakOutput(heatmap=attention.view(B, T, h, w), log_attention=log_attention.view(B, T, h, w),
                             visual=visual, sound=audio, negative_sound=negative_audio)

    def heatmaps(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        """The localisation map of each frame: {"senocak": α [B,T,h,w]}."""
        maps = self.visual(frames)  # [B·T, C, h, w]
        log_attention = self.attend(maps, self._heard(audio).flatten(0, 1))
        return {"senocak": log_attention.exp().view(*frames.shape[:2], *log_attention.shape[-2:])}


def senocak_loss(output: SenocakOutput, batch: dict, config: LossConfig) -> LossOutput:
    """L = w_U·L_U + λ·L_S over the clips that keep their ground truth (`loss.supervised_fraction`)."""
    parts: dict[str, Tensor] = {}
    if config.senocak_unsup:
        valid = output.negative_valid[:, None].expand(output.visual.shape[:2])  # [B, T]
        parts["senocak_unsup"] = senocak_unsupervised_loss(output.visual, output.sound, output.negative_sound, valid)
    if config.senocak_sup:
        B, T, h, w = output.log_attention.shape
        target, has_map = ground_truth_attention(batch["masks"].flatten(0, 1), batch["mask_valid"].flatten(0, 1),
                                                 batch["boxes"].flatten(0, 1), (h, w))
        kept = keeps_ground_truth(batch["name"], config.supervised_fraction, config.supervised_seed)
        valid = has_map & kept.to(has_map.device).repeat_interleave(T)  # [B·T]
        parts["senocak_sup"] = senocak_supervised_loss(output.log_attention.flatten(0, 1), target, valid)
    total = sum(getattr(config, name) * value for name, value in parts.items())
    return LossOutput(total=total, parts={name: value.detach() for name, value in parts.items()})


@register_model("senocak")
class SenocakKind(PairedAudioKind):
    """Attention-based sound-source localisation, unsupervised, supervised or semi-supervised."""

    losses = {"senocak_unsup": 1.0, "senocak_sup": 1.0}
    best_metric = "true.pointing"

    def network(self, visual: FrameEncoder, config: ModelConfig) -> SenocakNet:
        return SenocakNet(visual, config.audio_dim, hears=config.audio)

    def batch_fields(self, config: Config) -> tuple[str, ...]:
        return *super().batch_fields(config), "masks", "mask_valid", "boxes", "name"

    def compute_loss(self, output: SenocakOutput, batch: dict, config: LossConfig) -> LossOutput:
        return senocak_loss(output, batch, config)


__all__ = ["SenocakKind", "SenocakNet", "SenocakOutput", "senocak_loss"]
