"""AVE-Net (Arandjelović & Zisserman, ECCV 2018, "Objects that Sound"; docs/design.md §13), registered as
``model.kind = "avenet"``.

vision: backbone stage map (stride 8 by default, the map AVOL-Net reads: in the paper both share the vision
subnetwork up to its 14×14 map) → global max pool → FC128 → ReLU → FC128 → L2; audio: the shard's embedding of the
second → FC128 → ReLU → FC128 → L2; the Euclidean distance of the two (a scalar) → FC(1→2) → softmax: does this
frame go with this second of audio (audio-visual correspondence, AVC)? Trained with cross-entropy on positives
(frame t, second t of its own clip) and negatives (the same frame, second t of a clip whose class is not visible in
it, `loss.avc`).
Because the two embeddings meet only through a distance, they are aligned across modalities: the model retrieves
(im→aud, aud→im, im→im, aud→aud). It does not localise. Departures: our backbones from scratch, the shard's 128-d
embedding in place of the paper's log-spectrogram network, 64-px frames on the CPU benchmark, and the FC(1→2)
initialised so that "corresponds" wins below a distance of 1 (see `AVENet`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from .localiser_base import CorrespondenceKind, FrameEncoder
from .registry import register_model


@dataclass
class AVEOutput:
    """What ``AVENet.forward`` returns for B clips of T frames."""

    logits: Tensor  # [B, T, 2] AVC logits of (frame t, own second t); class 1 = corresponds
    image_embedding: Tensor  # [B, T, E] L2-normalised
    audio_embedding: Tensor  # [B, T, E] L2-normalised
    negative_logits: Tensor | None = None  # [B, T, 2] of (frame t, the negative clip's second t)
    negative_valid: Tensor | None = None  # [B] bool (set by the kind)


def embedding_head(in_features: int, dim: int) -> nn.Sequential:
    """FC → ReLU → FC: the last layers of both of the paper's subnetworks."""
    return nn.Sequential(nn.Linear(in_features, dim), nn.ReLU(), nn.Linear(dim, dim))


class AVENet(nn.Module):
    """``forward(frames [B,T,3,H,W], audio [B,T,D], negative_audio [B,T,D] or None) -> AVEOutput``."""

    def __init__(self, visual: FrameEncoder, audio_dim: int = 128, embed_dim: int = 128, hears: bool = True) -> None:
        super().__init__()
        self.visual = visual
        self.hears = hears
        self.vision_head = embedding_head(visual.channels, embed_dim)
        self.audio_head = embedding_head(audio_dim, embed_dim)
        # distance d → two-way logits, starting as 10·(d - 1) for "no" and 10·(1 - d) for "corresponds": the boundary
        # between a matched pair (d = 0) and unrelated unit vectors (d ≈ √2), with a slope that lets the loss move
        # the embeddings. From PyTorch's default (slope ≈ 0.5, either sign) AVC accuracy was 0.74 after 200 steps,
        # against 0.998 with this start, and when "far" happened to start as "corresponds", the embeddings learnt
        # the inverted geometry: nDCG 0.09 below chance (synthetic benchmark, 64 px, docs/design.md §13).
        self.calibration = nn.Linear(1, 2)
        with torch.no_grad():
            self.calibration.weight.copy_(torch.tensor([[10.0], [-10.0]]))
            self.calibration.bias.copy_(torch.tensor([-10.0, 10.0]))

    def embed_images(self, images: Tensor) -> Tensor:
        """images [N,3,H,W] (frames or crops; uint8 or float in 0..1) -> [N,E], L2-normalised."""
        pooled = self.visual.encode_images(images).amax(dim=(2, 3))  # [N, C]: global max pool
        return F.normalize(self.vision_head(pooled).float(), dim=-1)

    def embed_audio(self, audio: Tensor) -> Tensor:
        """audio [..., D] -> [..., E], L2-normalised."""
        audio = audio if self.hears else torch.zeros_like(audio)
        return F.normalize(self.audio_head(audio).float(), dim=-1)

    def correspondence_logits(self, images: Tensor, audio: Tensor) -> Tensor:
        """Embeddings [..., E] of both -> AVC logits [..., 2] from their Euclidean distance."""
        return self.calibration((images - audio).norm(dim=-1, keepdim=True))

    def forward(self, frames: Tensor, audio: Tensor, negative_audio: Tensor | None = None) -> AVEOutput:
        B, T = frames.shape[:2]
        images = self.embed_images(frames.flatten(0, 1)).view(B, T, -1)  # [B, T, E]
        sounds = self.embed_audio(audio)  # [B, T, E]
        output = AVEOutput(logits=self.correspondence_logits(images, sounds), image_embedding=images,
                           audio_embedding=sounds)
        if negative_audio is not None:
            output.negative_logits = self.correspondence_logits(images, self.embed_audio(negative_audio))
        return output

    def correspondence(self, frames: Tensor, audio: Tensor) -> Tensor:
        """P(frame t goes with second t) [B,T]."""
        return self.forward(frames, audio).logits.float().softmax(dim=-1)[..., 1]


@register_model("avenet")
class AVENetKind(CorrespondenceKind):
    """Audio-visual correspondence with aligned embeddings (retrieval)."""

    best_metric = "avc.accuracy"

    def network(self, visual: FrameEncoder, config: ModelConfig) -> AVENet:
        return AVENet(visual, config.audio_dim, config.embed_dim, hears=config.audio)


__all__ = ["AVENet", "AVENetKind", "AVEOutput", "embedding_head"]
