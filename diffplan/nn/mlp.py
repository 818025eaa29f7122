"""MLP denoiser for short chunks (a few steps of actions or states), flattened.

``x (B, H, D)`` is flattened to ``H * D`` features; the conditioning vector (noise level plus
optional condition, ``TimeCondEmbedding``) is added after the input projection, and every
hidden layer is a pre-norm residual MLP block. Cheap and strong for ``H * D`` up to a few
hundred; for long horizons use ``TemporalUNet`` or ``Transformer1d``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import TimeCondEmbedding


@dataclass
class MLPDenoiserConfig:
    transition_dim: int
    horizon: int
    hidden: int = 256
    depth: int = 3
    cond_dim: int = 0
    emb_dim: int = 64


class MLPDenoiser(nn.Module):
    """``forward(x (B, H, D), t (B,) in [0, 1], cond (B, C) | None) -> (B, H, D)``."""

    def __init__(self, transition_dim: int | None = None, horizon: int | None = None, hidden: int = 256, depth: int = 3,
                 cond_dim: int = 0, emb_dim: int = 64, config: MLPDenoiserConfig | None = None):
        super().__init__()
        if config is None:
            config = MLPDenoiserConfig(transition_dim, horizon, hidden, depth, cond_dim, emb_dim)
        self.config = c = config
        self.embed = TimeCondEmbedding(c.emb_dim, out_dim=c.hidden, cond_dim=c.cond_dim)
        self.inp = nn.Linear(c.horizon * c.transition_dim, c.hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(c.hidden) for _ in range(c.depth))
        self.layers = nn.ModuleList(nn.Linear(c.hidden, c.hidden) for _ in range(c.depth))
        self.out = nn.Linear(c.hidden, c.horizon * c.transition_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        B, H, D = x.shape
        if (H, D) != (self.config.horizon, self.config.transition_dim):
            raise ValueError(f"MLPDenoiser was built for (H, D) = {(self.config.horizon, self.config.transition_dim)}, "
                             f"got {(H, D)}")
        h = self.inp(x.reshape(B, H * D)) + self.embed(t, cond)
        for norm, layer in zip(self.norms, self.layers):
            h = h + layer(F.mish(norm(h)))
        return self.out(F.mish(h)).view(B, H, D)
