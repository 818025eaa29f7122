"""Noise-level and condition embeddings shared by every diffplan denoiser.

A denoiser receives the noise level ``t`` as a float tensor ``(B,)`` in ``[0, 1]``
(``diffplan.diffusion`` convention: ``t = 0`` is data, ``t = 1`` is noise). The
sinusoidal features are computed on ``scale * t`` with ``scale = 1000`` by default,
so that ``t = (i + 1) / 1000`` gives the same features a DDPM network sees for the
integer step ``i + 1``: frequencies and phases then spread the way Transformer /
DDPM position embeddings were designed for (Vaswani et al. 2017; Ho et al. 2020).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """``t (B,) -> (B, dim)`` with features ``[sin(w_k s t), cos(w_k s t)]``.

    ``w_k = 10000^(-k / (dim/2 - 1))`` and ``s = scale``. Frequencies (with the scale
    folded in) and phases are precomputed buffers; ``cos(a) = sin(a + pi/2)`` turns the
    embedding into two tensor ops (one ``addcmul``, one ``sin``).
    """

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"SinusoidalEmbedding: dim must be even and >= 4, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - 1))
        freqs = (scale * freqs).repeat(2)
        phase = torch.cat([torch.zeros(half), torch.full((half,), math.pi / 2)])
        self.dim = dim
        # Non-persistent: derived from (dim, scale); keeps checkpoints free of constants.
        self.register_buffer("freqs", freqs.float(), persistent=False)
        self.register_buffer("phase", phase.float(), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.phase, t.to(self.freqs.dtype).unsqueeze(-1), self.freqs).sin()


class TimeCondEmbedding(nn.Module):
    """``(t (B,), cond (B, C) | None) -> (B, out_dim)``: the one conditioning vector.

    ``MLP(sinusoid(t)) + MLP(cond)`` (the condition MLP only when ``cond_dim > 0`` and
    ``cond`` is given; with ``cond=None`` no condition work is done at all). This is
    Janner et al.'s time MLP (Linear, Mish, Linear) with Decision Diffuser's condition
    embedding added to it.
    """

    def __init__(self, dim: int, out_dim: int | None = None, cond_dim: int = 0, hidden: int | None = None):
        super().__init__()
        out_dim = out_dim or dim
        hidden = hidden or 4 * dim
        self.sinusoid = SinusoidalEmbedding(dim)
        self.time_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Mish(), nn.Linear(hidden, out_dim))
        self.cond_dim = cond_dim
        self.cond_mlp = (
            nn.Sequential(nn.Linear(cond_dim, hidden), nn.Mish(), nn.Linear(hidden, out_dim)) if cond_dim > 0 else None
        )

    def forward(self, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        e = self.time_mlp(self.sinusoid(t))
        if cond is not None:
            if self.cond_mlp is None:
                raise ValueError("this network was built with cond_dim=0 but received a condition")
            e = e + self.cond_mlp(cond)
        return e
