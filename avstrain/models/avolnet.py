"""AVOL-Net (Arandjelović & Zisserman, ECCV 2018, "Objects that Sound"; docs/design.md §13), registered as
``model.kind = "avolnet"``.

The vision map stays spatial: a backbone stage (stride 8 by default; the paper's 14×14 at 224 px is stride 16) →
1×1 conv 128 → ReLU → 1×1 conv 128 (no L2); audio: the shard's embedding → FC128 → ReLU → FC128 (no L2). The dot
product of the audio embedding with each cell → a 1×1 conv (calibration: a learnt scale and bias) → sigmoid gives a
per-cell correspondence map; its maximum over the cells (multiple-instance learning: the sound comes from somewhere)
is the frame's AVC probability, trained with the logistic loss on the same positives and negatives as AVE-Net
(`loss.avc`). The per-cell map localises.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .avenet import embedding_head
from .localiser_base import CorrespondenceKind, FrameEncoder
from .registry import register_model


@dataclass
class AVOLOutput:
    """What ``AVOLNet.forward`` returns for B clips of T frames on the h×w grid of the feature stage."""

    heatmap: Tensor  # [B, T, h, w] per-cell correspondence probability with the own audio
    logits: Tensor  # [B, T] the frame's AVC logit: the maximum of the cell logits
    negative_logits: Tensor | None = None  # [B, T] with the negative clip's audio
    negative_valid: Tensor | None = None  # [B] bool (set by the kind)


class AVOLNet(nn.Module):
    """``forward(frames [B,T,3,H,W], audio [B,T,D], negative_audio [B,T,D] or None) -> AVOLOutput``."""

    def __init__(self, visual: FrameEncoder, audio_dim: int = 128, embed_dim: int = 128, hears: bool = True) -> None:
        super().__init__()
        self.visual = visual
        self.hears = hears
        self.vision_head = nn.Sequential(nn.Conv2d(visual.channels, embed_dim, 1), nn.ReLU(),
                                         nn.Conv2d(embed_dim, embed_dim, 1))
        self.audio_head = embedding_head(audio_dim, embed_dim)
        self.calibration = nn.Conv2d(1, 1, 1)
        # Dot products of two unnormalised 128-d embeddings start large: a small scale keeps the sigmoid out of
        # saturation at the start.
        nn.init.constant_(self.calibration.weight, 0.1)
        nn.init.zeros_(self.calibration.bias)

    def cell_logits(self, cells: Tensor, audio: Tensor) -> Tensor:
        """cells [N,E,h,w], audio [N,D] -> calibrated per-cell logits [N,h,w]."""
        sound = self.audio_head(audio if self.hears else torch.zeros_like(audio))  # [N, E]
        scores = torch.einsum("nehw,ne->nhw", cells.float(), sound.float())  # [N, h, w]
        return self.calibration(scores[:, None])[:, 0]

    def forward(self, frames: Tensor, audio: Tensor, negative_audio: Tensor | None = None) -> AVOLOutput:
        B, T = frames.shape[:2]
        cells = self.vision_head(self.visual(frames))  # [B·T, E, h, w]
        logits = self.cell_logits(cells, audio.flatten(0, 1))  # [B·T, h, w]
        h, w = logits.shape[-2:]
        # max over cells of sigmoid(l) = sigmoid of the max: the loss takes the logit, the stable form.
        output = AVOLOutput(heatmap=logits.sigmoid().view(B, T, h, w), logits=logits.amax(dim=(1, 2)).view(B, T))
        if negative_audio is not None:
            negative = self.cell_logits(cells, negative_audio.flatten(0, 1))
            output.negative_logits = negative.amax(dim=(1, 2)).view(B, T)
        return output

    def heatmaps(self, frames: Tensor, audio: Tensor) -> dict[str, Tensor]:
        """{"avolnet": per-cell correspondence probability [B,T,h,w]}."""
        return {"avolnet": self.forward(frames, audio).heatmap}

    def correspondence(self, frames: Tensor, audio: Tensor) -> Tensor:
        """P(frame t goes with second t) [B,T]: the most corresponding cell's."""
        return self.forward(frames, audio).logits.float().sigmoid()


@register_model("avolnet")
class AVOLNetKind(CorrespondenceKind):
    """Correspondence by multiple-instance learning over cells; the per-cell map localises."""

    best_metric = "true.pointing"

    def network(self, visual: FrameEncoder, config: ModelConfig) -> AVOLNet:
        return AVOLNet(visual, config.audio_dim, config.embed_dim, hears=config.audio)


__all__ = ["AVOLNet", "AVOLNetKind", "AVOLOutput"]
