"""TPAVI: temporal pixel-wise audio-visual interaction (AVSBench, Zhou et al. 2022), in factorised form.

The reference builds the affinity f = θᵀφ / N over all N = T·h·w positions of a clip, a matrix of N×N
(15680×15680 at stage 1 of a 224 px, T=5 clip), and multiplies it with g. φ comes from the audio broadcast over
h, w, so it is constant within a frame, and the product factorises exactly:

    y_i = Σ_j (θ_i·φ_t(j)) g_j / N = θ_iᵀ (Σ_t φ_t G_tᵀ) / N,    G_t = Σ_{j in frame t} g_j.

``TPAVI`` computes that form (memory O(N·C)); ``tpavi_naive`` is the reference's formula on the same weights,
kept for the equivalence test and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class TPAVIOutput:
    visual: Tensor  # [B, C, T, h, w], LayerNorm_C(BN(W_z y) + V)
    audio_proj: Tensor  # [B, T, C], the audio after Linear(audio_dim, C)
    av_scores: Tensor  # [B, T, h, w], θ_i·φ_t: each position of frame t against its own frame's audio


class TPAVI(nn.Module):
    """Audio-visual non-local block in "dot" mode with the reference's layout and parameter shapes.

    θ, φ, g are 1×1×1 Conv3d C→C/2 (φ is applied to the broadcast audio, hence a Conv3d too, which keeps
    checkpoint shapes), W_z is Conv3d C/2→C followed by BatchNorm3d initialised to zero, so a fresh block is the
    identity up to the LayerNorm.
    """

    def __init__(self, channels: int = 256, audio_dim: int = 128, naive: bool = False,
                 audio_proj_bias: bool = True, bn_init: float = 0.0) -> None:
        super().__init__()
        inter = max(channels // 2, 1)
        self.channels, self.inter_channels = channels, inter
        # True: forward runs the reference's N×N formula (`tpavi_naive`), for benchmarks against the reference;
        # same weights and outputs, memory O(N²).
        self.naive = naive
        # AVSS's `align_channel` has no bias, S4/MS3's has one.
        self.audio_proj = nn.Linear(audio_dim, channels, bias=audio_proj_bias)
        self.theta = nn.Conv3d(channels, inter, kernel_size=1)
        self.phi = nn.Conv3d(channels, inter, kernel_size=1)
        self.g = nn.Conv3d(channels, inter, kernel_size=1)
        self.out_conv = nn.Conv3d(inter, channels, kernel_size=1)
        self.out_bn = nn.BatchNorm3d(channels)
        self.norm = nn.LayerNorm(channels)
        # bn_init 0 (the reference): the identity at the start. Non-zero: the interaction contributes, and trains,
        # from the first step (`model.tpavi_bn_init`, docs/design.md §17).
        nn.init.constant_(self.out_bn.weight, bn_init)
        nn.init.zeros_(self.out_bn.bias)

    def forward(self, visual: Tensor, audio: Tensor) -> TPAVIOutput:
        """visual [B, C, T, h, w], audio [B, T, audio_dim] -> TPAVIOutput."""
        if self.naive:
            z, a = tpavi_naive(self, visual, audio)
            phi = F.linear(a, self.phi.weight.flatten(1), self.phi.bias)  # [B, T, C']
            av_scores = torch.einsum("bcthw,btc->bthw", self.theta(visual), phi)
            return TPAVIOutput(visual=z, audio_proj=a, av_scores=av_scores)
        B, C, T, h, w = visual.shape
        n = T * h * w
        a = self.audio_proj(audio)  # [B, T, C]
        # φ on audio broadcast over h, w equals the same 1×1×1 conv on one vector per frame.
        phi = F.linear(a, self.phi.weight.flatten(1), self.phi.bias)  # [B, T, C']
        theta = self.theta(visual)  # [B, C', T, h, w]
        g = self.g(visual)  # [B, C', T, h, w]

        g_frame = g.sum(dim=(3, 4))  # [B, C', T]: G_t
        m = torch.bmm(g_frame, phi)  # [B, C'(g), C'(φ)]: Σ_t G_t φ_tᵀ
        y = torch.bmm(m, theta.flatten(2)) / n  # [B, C', T·h·w]: y_i = (Σ_t G_t φ_tᵀ) θ_i / N
        y = y.view(B, self.inter_channels, T, h, w)

        z = self.out_bn(self.out_conv(y)) + visual  # [B, C, T, h, w]
        z = self.norm(z.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)  # LayerNorm over C

        av_scores = torch.einsum("bcthw,btc->bthw", theta, phi)  # [B, T, h, w]
        return TPAVIOutput(visual=z, audio_proj=a, av_scores=av_scores)


def tpavi_naive(block: TPAVI, visual: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
    """The reference TPAVI forward on ``block``'s weights: the full N×N affinity, N = T·h·w.

    visual [B, C, T, h, w], audio [B, T, audio_dim] -> (z [B, C, T, h, w], audio_proj [B, T, C]).
    Memory grows with N²; use it for tests and benchmarks only.
    """
    B, C, T, h, w = visual.shape
    a = block.audio_proj(audio)  # [B, T, C]
    audio_map = a.permute(0, 2, 1)[..., None, None].repeat(1, 1, 1, h, w)  # [B, C, T, h, w]
    g_x = block.g(visual).view(B, block.inter_channels, -1).permute(0, 2, 1)  # [B, N, C']
    theta_x = block.theta(visual).view(B, block.inter_channels, -1).permute(0, 2, 1)  # [B, N, C']
    phi_x = block.phi(audio_map).view(B, block.inter_channels, -1)  # [B, C', N]
    f = torch.matmul(theta_x, phi_x)  # [B, N, N]
    f_div_n = f / f.size(-1)
    y = torch.matmul(f_div_n, g_x)  # [B, N, C']
    y = y.permute(0, 2, 1).contiguous().view(B, block.inter_channels, T, h, w)
    z = block.out_bn(block.out_conv(y)) + visual
    z = block.norm(z.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
    return z, a
