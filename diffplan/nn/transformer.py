"""DiT-style trajectory transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

One token per time step: ``Linear(D -> width)`` plus a fixed sinusoidal position code. Each
block is pre-LayerNorm self-attention and an MLP, both modulated by the conditioning vector
``c = TimeCondEmbedding(t, cond)`` through adaLN-Zero: ``x + gate * f(LN(x) * (1 + scale) + shift)``
with the ``(shift, scale, gate)`` projections initialised to zero, so every block starts as
the identity; the output layer is zero-initialised too (DiT, section 3.2). Attention is
bidirectional over the horizon (``F.scaled_dot_product_attention``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import TimeCondEmbedding


@dataclass
class Transformer1dConfig:
    transition_dim: int
    width: int = 128
    depth: int = 4
    heads: int = 4
    cond_dim: int = 0
    horizon_max: int = 1024
    mlp_ratio: float = 4.0


def sinusoidal_positions(n: int, width: int) -> torch.Tensor:
    """``(n, width)`` fixed position code (Vaswani et al. 2017)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, width, 2, dtype=torch.float64) / width)
    pe = torch.zeros(n, width, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freqs)
    pe[:, 1::2] = torch.cos(pos * freqs)
    return pe.float()


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.modulation = nn.Linear(width, 6 * width)  # adaLN-Zero: shift, scale, gate for attention and MLP
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, H, W = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).unsqueeze(1).chunk(6, dim=-1)
        h = torch.addcmul(shift1, self.norm1(x), 1 + scale1)
        q, k, v = self.qkv(h).view(B, H, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H, W)
        x = torch.addcmul(x, gate1, self.proj(h))
        h = torch.addcmul(shift2, self.norm2(x), 1 + scale2)
        return torch.addcmul(x, gate2, self.mlp(h))


class Transformer1d(nn.Module):
    """``forward(x (B, H, D), t (B,) in [0, 1], cond (B, C) | None) -> (B, H, D)``, ``H <= horizon_max``."""

    def __init__(self, transition_dim: int | None = None, width: int = 128, depth: int = 4, heads: int = 4,
                 cond_dim: int = 0, horizon_max: int = 1024, mlp_ratio: float = 4.0,
                 config: Transformer1dConfig | None = None):
        super().__init__()
        if config is None:
            config = Transformer1dConfig(transition_dim, width, depth, heads, cond_dim, horizon_max, mlp_ratio)
        self.config = c = config
        if c.width % c.heads:
            raise ValueError(f"Transformer1d: width {c.width} is not divisible by heads {c.heads}")
        self.inp = nn.Linear(c.transition_dim, c.width)
        self.register_buffer("pos", sinusoidal_positions(c.horizon_max, c.width), persistent=False)
        self.embed = TimeCondEmbedding(c.width, cond_dim=c.cond_dim)
        self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm_out = nn.LayerNorm(c.width, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Linear(c.width, 2 * c.width)
        self.out = nn.Linear(c.width, c.transition_dim)
        for layer in (self.modulation_out, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        H = x.shape[1]
        if H > self.config.horizon_max:
            raise ValueError(f"Transformer1d: horizon {H} exceeds horizon_max={self.config.horizon_max}")
        c = F.silu(self.embed(t, cond))
        x = self.inp(x) + self.pos[:H]
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.modulation_out(c).unsqueeze(1).chunk(2, dim=-1)
        return self.out(torch.addcmul(shift, self.norm_out(x), 1 + scale))
