"""A small GPT-style causal transformer with a KV cache (in the manner of nanoGPT's ``model.py``).

Used by :class:`~diffplan.policies.trajectory_diffuser.TrajectoryDiffuser` as its drafter: a
sequence of per-step tokens (states), optionally preceded by one conditioning token (a goal or
a return-to-go), predicts a feature vector at every token position. Position ``i`` attends to
positions ``<= i`` only (a real causal mask), so the prediction at a token never depends on
later tokens.

Incremental decoding: ``cache = model.new_cache(batch)`` preallocates the keys and values of
every layer; each ``model(x, cond, cache=cache)`` call appends its tokens and attends to all
cached ones, so drafting ``n`` steps costs ``n`` one-token passes instead of ``n`` full passes.
The result equals a full recomputation of the whole sequence (tested).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CausalTransformerConfig:
    in_dim: int  # features of one input token
    out_dim: int  # features predicted at each input token
    cond_dim: int = 0  # features of the conditioning prefix token; 0: no prefix
    max_len: int = 128  # longest sequence, the prefix token included
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        if min(self.in_dim, self.out_dim, self.max_len, self.width, self.depth, self.heads) < 1:
            raise ValueError("in_dim, out_dim, max_len, width, depth and heads must be >= 1")


class KVCache:
    """Keys and values of every layer for a batch, preallocated to ``max_len`` positions."""

    def __init__(self, depth: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.length = 0  # positions filled (the same for every layer once a forward pass ends)
        self.max_len = max_len


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: CausalTransformerConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        past = 0
        if cache is not None:
            past = cache.length
            cache.k[layer][:, :, past: past + t] = k
            cache.v[layer][:, :, past: past + t] = v
            k, v = cache.k[layer][:, :, : past + t], cache.v[layer][:, :, : past + t]
        drop = self.dropout if self.training else 0.0
        if t == 1:  # one new token sees every cached one: no mask needed
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:  # a chunk after a prefix: query i sits at absolute position past + i
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: CausalTransformerConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class CausalTransformer(nn.Module):
    """Tokens ``x: (B, T, in_dim)`` after an optional prefix ``cond: (B, cond_dim)`` ->
    predictions ``(B, T, out_dim)``, one per input token (none for the prefix).

    With a ``cache``, ``cond`` must be given exactly when the cache is empty (the prefix is
    position 0) and the tokens continue the cached sequence.
    """

    def __init__(self, cfg: CausalTransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.token = nn.Linear(cfg.in_dim, cfg.width)
        self.cond = nn.Linear(cfg.cond_dim, cfg.width) if cfg.cond_dim else None
        self.pos = nn.Embedding(cfg.max_len, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.out_dim)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.depth))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def new_cache(self, batch: int, device=None, dtype=torch.float32) -> KVCache:
        cfg = self.cfg
        device = device if device is not None else self.pos.weight.device
        return KVCache(cfg.depth, batch, cfg.heads, cfg.max_len, cfg.width // cfg.heads, device, dtype)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        cfg = self.cfg
        if x.ndim != 3 or x.shape[-1] != cfg.in_dim:
            raise ValueError(f"tokens must have shape (B, T, {cfg.in_dim}), got {tuple(x.shape)}")
        past = 0 if cache is None else cache.length
        prefix = cond is not None
        if prefix != (self.cond is not None and past == 0):
            raise ValueError("give cond exactly on the first pass of a model with cond_dim > 0 "
                             f"(cond_dim={cfg.cond_dim}, cached positions={past})")
        h = self.token(x)
        if prefix:
            if cond.shape != (x.shape[0], cfg.cond_dim):
                raise ValueError(f"cond must have shape ({x.shape[0]}, {cfg.cond_dim}), got {tuple(cond.shape)}")
            h = torch.cat([self.cond(cond)[:, None], h], 1)
        t = h.shape[1]
        if past + t > cfg.max_len:
            raise ValueError(f"sequence of {past + t} positions exceeds max_len={cfg.max_len}")
        h = self.drop(h + self.pos.weight[past: past + t])
        for i, block in enumerate(self.blocks):
            h = block(h, cache, i)
        if cache is not None:
            cache.length = past + t
        out = self.head(self.ln_f(h))
        return out[:, 1:] if prefix else out
