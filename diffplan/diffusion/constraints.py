"""Inpainting constraints: fixed values at given time indices and feature dims of a trajectory.

Diffuser conditions a plan on the current state (and, for mazes, the goal) by overwriting
those entries of the sample before the first step and after every step (Janner et al. 2022,
section 3.3). The model never sees the constraint as an input, so it can change every call.

    c = Constraints([0], slice(0, obs_dim), obs[:, None])            # x[:, 0, :obs_dim] = obs
    c = Constraints.start_goal(obs, goal, dims=slice(0, 2))           # x[:, 0, :2] = obs, x[:, -1, :2] = goal
    c = c1 + c2                                                       # later parts win where they overlap
    x = c.apply(x)                                                    # out of place

``sample()`` turns them once per call into a boolean mask and a fill tensor (``dense``), so each
step applies them with a single ``torch.where``.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


def _indices(index, n: int, device) -> torch.Tensor:
    """Time or feature indices as a long tensor in ``[0, n)``; negative values count from the end."""
    if isinstance(index, slice):
        return torch.arange(n, device=device)[index]
    if isinstance(index, torch.Tensor):
        return index.to(device).long().reshape(-1) % n
    return _host_indices(tuple(int(i) % n for i in ([index] if isinstance(index, int) else index)),
                         torch.device(device))


@functools.lru_cache(maxsize=None)
def _host_indices(index: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Indices given on the host, copied to ``device`` once and kept: a plan captured in a CUDA
    graph reads them, so they must neither be copied inside the capture nor ever be freed."""
    return torch.tensor(index, dtype=torch.long, device=device)


class Constraints:
    """``Constraints(index, dims, values)``: ``x[:, index, dims] = values``.

    * ``index``: time indices (int, list, slice or LongTensor; negative counts from the end).
    * ``dims``: feature indices (slice or list); default all features.
    * ``values``: broadcastable to ``(B, len(index), len(dims))``.
    """

    def __init__(self, index, dims=slice(None), values: torch.Tensor | None = None):
        if values is None:
            raise ValueError("Constraints needs values: Constraints(index, dims, values)")
        self.parts = [(index, dims, values)]

    @classmethod
    def start_goal(cls, start: torch.Tensor, goal: torch.Tensor | None = None, dims=None) -> Constraints:
        """``x[:, 0, dims] = start`` and, if given, ``x[:, -1, dims] = goal``; ``start, goal``: ``(B, d)``.

        ``dims`` defaults to the first ``d`` features.
        """
        dims = slice(0, start.shape[-1]) if dims is None else dims
        c = cls([0], dims, start.unsqueeze(-2))
        if goal is not None:
            c = c + cls([-1], dims, goal.unsqueeze(-2))
        return c

    def __add__(self, other: Constraints | None) -> Constraints:
        if other is None:
            return self
        out = Constraints.__new__(Constraints)
        out.parts = self.parts + other.parts
        return out

    def __radd__(self, other) -> Constraints:  # lets sum([c1, c2]) work (it starts from 0)
        return self if other is None or (isinstance(other, int) and other == 0) else other + self

    def dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask (H, D) bool, fill (B, H, D))`` for a sample shaped like ``x``."""
        B, H, D = x.shape
        mask = torch.zeros(H, D, dtype=torch.bool, device=x.device)
        # A device True, not a Python one: on CUDA, a Python scalar assigned through index tensors
        # is staged on the host and copied over, which a CUDA-graph capture refuses.
        true = torch.ones((), dtype=torch.bool, device=x.device)
        fill = torch.zeros_like(x)
        for index, dims, values in self.parts:
            idx = _indices(index, H, x.device)[:, None]
            dim = _indices(dims, D, x.device)[None, :]
            values = values.to(device=x.device, dtype=x.dtype)
            try:
                values = values.expand(B, idx.shape[0], dim.shape[1])
            except RuntimeError:
                raise ValueError(f"constraint values of shape {tuple(values.shape)} do not broadcast to "
                                 f"(B, n_index, n_dims) = {(B, idx.shape[0], dim.shape[1])}") from None
            fill[:, idx, dim] = values
            mask[idx, dim] = true
        return mask, fill

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        mask, fill = self.dense(x)
        return torch.where(mask, fill, x)


def as_constraints(c) -> Constraints | None:
    """``None``, a ``Constraints``, or a list of them (``None`` entries skipped) -> one ``Constraints``."""
    if c is None or isinstance(c, Constraints):
        return c
    if isinstance(c, Sequence):
        parts = [p for p in c if p is not None]
        if not parts:
            return None
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out
    raise TypeError(f"constraints must be a Constraints, a list of them, or None; got {type(c).__name__}")
