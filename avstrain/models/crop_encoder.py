"""Crop encoder of the seed project (docs/design.md §7): ResNet trunk -> global average pool -> Linear(→E) -> Linear(E→K).

Two modes: ``separate`` owns its trunk (the seed's setup); ``shared`` owns none and is handed the segmentation
backbone at call time, so the crop losses shape the features the segmenter uses. The shared trunk is passed in
rather than stored so that it is registered once, under ``backbone.``, in the model's state dict.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .backbones import Backbone


@dataclass
class CropOutput:
    embedding: Tensor  # [N, E]
    logits: Tensor | None  # [N, num_classes], None without a classifier


class CropEncoder(nn.Module):
    """Embeds object crops; also holds the audio projection that the audio–crop agreement loss compares them with."""

    def __init__(self, in_channels: int, num_classes: int = 0, embed_dim: int = 512, audio_dim: int = 128,
                 trunk: Backbone | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Linear(in_channels, embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes) if num_classes > 0 else None
        self.audio_proj = nn.Linear(audio_dim, embed_dim)

    def forward(self, crops: Tensor, shared_trunk: Backbone | None = None) -> CropOutput:
        """crops [N, 3, h, w], already normalised -> CropOutput(embedding [N, E], logits [N, K] or None).

        ``shared_trunk`` is required in shared mode (no own trunk) and must be None otherwise.
        """
        if (self.trunk is None) == (shared_trunk is None):
            raise ValueError("pass shared_trunk exactly when the crop encoder has no trunk of its own")
        trunk = self.trunk if self.trunk is not None else shared_trunk
        features = trunk(crops)[-1]  # [N, c4, h/32, w/32]
        embedding = self.embed(self.pool(features).flatten(1))  # [N, E]
        logits = self.classifier(embedding) if self.classifier is not None else None
        return CropOutput(embedding=embedding, logits=logits)

    def project_audio(self, audio: Tensor) -> Tensor:
        """audio [B, T, audio_dim] -> [B, E]: the clip's embeddings averaged over T, then projected."""
        return self.audio_proj(audio.mean(dim=1))
