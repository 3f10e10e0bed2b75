"""Noise-conditioned building blocks shared by the soft-prompt generator, the score head and
the attribute heads.

Everything here is conditioned on the noise level through alpha^2 in [0, 1], embedded as
sinusoidal features of 1000 * alpha^2 followed by an MLP (as in STAR-LDM). Conditioning is
FiLM-style ("adaLN-zero"): a zero-initialised linear layer maps the time embedding to a
shift, scale and gate per sub-layer, so every block starts as the identity.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_features(values: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) -> (B, dim) sin/cos features at geometrically spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=values.device) / half)
    angles = values.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimeEmbedding(nn.Module):
    """alpha^2 (B,) -> (B, dim): sinusoidal features of 1000 * alpha^2, then an MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))

    def forward(self, alpha2: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_features(1000.0 * alpha2, self.dim))


def zero_init(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class FiLMTransformerBlock(nn.Module):
    """Bidirectional pre-norm transformer block whose norms are modulated by the time embedding."""

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm_attn = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))
        # shift, scale, gate for the attention and the MLP sub-layers
        self.modulation = zero_init(nn.Linear(width, 6 * width))

    def forward(self, h: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        # h (B, K, W), time (B, W)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(time)[:, None].chunk(6, dim=-1)
        a = self.norm_attn(h) * (1 + scale_a) + shift_a
        h = h + gate_a * self.attn(a, a, a, need_weights=False)[0]
        m = self.norm_mlp(h) * (1 + scale_m) + shift_m
        return h + gate_m * self.mlp(m)


class FiLMTransformer(nn.Module):
    def __init__(self, width: int, depth: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(FiLMTransformerBlock(width, num_heads, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)

    def forward(self, h: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, time)
        return self.norm_out(h)


class FiLMGLUBlock(nn.Module):
    """Residual MLP block for vectors: norm, FiLM by time, gated linear unit, zero-gated output."""

    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.modulation = zero_init(nn.Linear(width, 3 * width))
        self.glu = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        # h (B, W), time (B, W)
        shift, scale, gate = self.modulation(time).chunk(3, dim=-1)
        a, b = self.glu(self.norm(h) * (1 + scale) + shift).chunk(2, dim=-1)
        return h + (1 + gate) * self.out(self.dropout(a * torch.sigmoid(b)))
