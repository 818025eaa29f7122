"""Per-dimension normalizers, fitted on a dataset and saved with the policy that owns them.

They are `torch.nn.Module`s whose statistics are buffers, so `state_dict()` (and a policy's
``model.safetensors``) carries them with no extra code. `normalize` / `unnormalize` take numpy or
torch and return the same type; the last axis is the feature axis, ``x: (..., D)``.
Diffuser uses `LimitsNormalizer` for mazes and `GaussianNormalizer` for locomotion.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# A dimension whose spread is below this is treated as constant (no division by ~0).
_EPS = 1e-6

Array = np.ndarray | torch.Tensor


class Normalizer(nn.Module):
    """Affine per-dimension map ``z = (x - shift) / scale``; subclasses choose shift and scale."""

    kind = ""

    def __init__(self, dim: int):
        super().__init__()
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"normalizer dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)

    # Subclasses define the statistics buffers and these two.
    def _shift_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def fit(self, x: Array) -> Normalizer:
        """Fit the statistics on ``x: (N, D)`` in place; returns self."""
        raise NotImplementedError

    @classmethod
    def from_data(cls, x: Array) -> Normalizer:
        """A new normalizer fitted on ``x: (N, D)``."""
        data = _as_2d_numpy(x, None)
        return cls(data.shape[1]).fit(data)

    def normalize(self, x: Array) -> Array:
        """``x: (..., D)`` -> normalized, same type, dtype and device."""
        shift, scale = self._shift_scale()
        return self._elementwise(x, lambda v, s, c: (v - s) / c, shift, scale)

    def unnormalize(self, x: Array) -> Array:
        """Inverse of `normalize`."""
        shift, scale = self._shift_scale()
        return self._elementwise(x, lambda v, s, c: v * c + s, shift, scale)

    def forward(self, x: Array) -> Array:
        return self.normalize(x)

    def check(self) -> None:
        """``ValueError`` if the statistics cannot normalize: NaN or inf, or a scale <= 0. ``fit``
        never makes one (constant dimensions get scale 1), so such statistics were corrupted."""
        shift, scale = self._shift_scale()
        if not (torch.isfinite(shift).all() and torch.isfinite(scale).all()):
            raise ValueError(f"{type(self).__name__} statistics hold NaN or inf")
        bad = torch.nonzero(scale <= 0).flatten().tolist()
        if bad:
            raise ValueError(f"{type(self).__name__} has a zero or negative scale in dimension(s) {bad[:8]}; "
                             "a fitted normalizer never does (constant dimensions get scale 1), so its "
                             "statistics are corrupt")

    def _elementwise(self, x: Array, fn, shift: torch.Tensor, scale: torch.Tensor) -> Array:
        if x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects a last axis of size {self.dim}, "
                             f"got shape {tuple(x.shape)}")
        if isinstance(x, torch.Tensor):
            dtype = x.dtype if x.is_floating_point() else torch.float32
            x = x.to(dtype)
            return fn(x, shift.to(x.device, dtype), scale.to(x.device, dtype))
        if isinstance(x, np.ndarray):
            dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
            out = fn(x.astype(np.float64, copy=False), shift.double().cpu().numpy(),
                     scale.double().cpu().numpy())
            return out.astype(dtype, copy=False)
        raise TypeError(f"normalize expects a numpy array or a torch tensor, got {type(x).__name__}")

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class GaussianNormalizer(Normalizer):
    """``z = (x - mean) / std``; constant dimensions get std 1."""

    kind = "gaussian"

    def __init__(self, dim: int):
        super().__init__(dim)
        self.register_buffer("mean", torch.zeros(self.dim))
        self.register_buffer("std", torch.ones(self.dim))

    def fit(self, x: Array) -> GaussianNormalizer:
        data = _as_2d_numpy(x, self.dim)
        std = data.std(axis=0)
        self.mean.copy_(torch.from_numpy(data.mean(axis=0)))
        self.std.copy_(torch.from_numpy(np.where(std < _EPS, 1.0, std)))
        return self

    def _shift_scale(self):
        return self.mean, self.std


class LimitsNormalizer(Normalizer):
    """Maps ``[low, high]`` to ``[-1, 1]`` per dimension; a constant dimension c gets the range
    ``[c - 1, c + 1]``, so it maps to 0 instead of dividing by zero."""

    kind = "limits"

    def __init__(self, dim: int):
        super().__init__(dim)
        self.register_buffer("low", -torch.ones(self.dim))
        self.register_buffer("high", torch.ones(self.dim))

    def fit(self, x: Array) -> LimitsNormalizer:
        data = _as_2d_numpy(x, self.dim)
        low, high = data.min(axis=0), data.max(axis=0)
        flat = (high - low) < _EPS
        self.low.copy_(torch.from_numpy(np.where(flat, low - 1.0, low)))
        self.high.copy_(torch.from_numpy(np.where(flat, high + 1.0, high)))
        return self

    def _shift_scale(self):
        # (x - low) / (high - low) * 2 - 1  ==  (x - mid) / half_range
        return (self.high + self.low) / 2, (self.high - self.low) / 2


NORMALIZERS: dict[str, type[Normalizer]] = {
    "gaussian": GaussianNormalizer,
    "limits": LimitsNormalizer,
}


def make_normalizer(kind: str, dim: int) -> Normalizer:
    """An unfitted normalizer of `kind` ('gaussian' or 'limits') for ``dim`` features (ready for
    `load_state_dict` or `fit`)."""
    if kind not in NORMALIZERS:
        raise ValueError(f"unknown normalizer '{kind}'; choose one of {', '.join(NORMALIZERS)}")
    return NORMALIZERS[kind](dim)


def _as_2d_numpy(x: Array, dim: int | None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    data = np.asarray(x, dtype=np.float64)
    if data.ndim != 2 or len(data) == 0:
        raise ValueError(f"fit expects a non-empty array of shape (N, D), got {data.shape}")
    if dim is not None and data.shape[1] != dim:
        raise ValueError(f"fit expects D={dim} features, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError("fit got non-finite values (NaN or inf)")
    return data
