"""What an audio embedder takes and gives: log-mel examples [n, 96, 64] in, embeddings [n, EMBEDDING_DIM] out.

The contract between the front end (`avsprep.audio`, with the weight-free embedder) and the VGGish network
(`avsprep.vggish`, which imports torch), in a module both import, so that neither imports the other at module level.
The shards store one embedding per second (`audio` [N, T, EMBEDDING_DIM], `avsprep.shards`), and the models'
`audio_dim` is this size.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

FRAMES_PER_EXAMPLE = 96  # 0.96 s of 10 ms log-mel frames
NUM_BANDS = 64
EMBEDDING_DIM = 128


@runtime_checkable
class Embedder(Protocol):
    """Maps log-mel examples [n, 96, 64] to embeddings [n, EMBEDDING_DIM] float32."""

    name: str

    def embed(self, examples: np.ndarray) -> np.ndarray: ...


def check_examples(examples: np.ndarray) -> np.ndarray:
    """`examples` as an array, after checking it is [n, 96, 64]; ValueError otherwise (a caller's bug, not input)."""
    examples = np.asarray(examples)
    if examples.ndim != 3 or examples.shape[1:] != (FRAMES_PER_EXAMPLE, NUM_BANDS):
        raise ValueError(f"expected examples of shape [n, {FRAMES_PER_EXAMPLE}, {NUM_BANDS}], got {examples.shape}")
    return examples
