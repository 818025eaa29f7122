"""Training objectives and the one place where network outputs become ``x0`` estimates.

With ``x_t = alpha x0 + sigma eps`` (``alpha, sigma, alpha', sigma'`` from the schedule at ``t``):

=========  ===============================  ================================================
objective  the network predicts             ``x0`` from the prediction ``y``
=========  ===============================  ================================================
``x0``     ``x0`` (Diffuser)                ``y``
``eps``    ``eps`` (DDPM, Diffusion Policy) ``(x_t - sigma y) / alpha``
``v``      ``alpha eps - sigma x0``         ``(alpha x_t - sigma y) / (alpha^2 + sigma^2)``
           (Salimans & Ho 2022)             (``= alpha x_t - sigma y`` for VP schedules)
``flow``   ``dx_t/dt = alpha' x0 + sigma'   ``(sigma' x_t - sigma y) / (alpha sigma' - sigma alpha')``
           eps`` (for rectified flow:       (rectified flow: ``x_t - t y``)
           ``eps - x0``; Lipman et al. 2022)
=========  ===============================  ================================================

Every solver works on the resulting denoiser ``D(x_t, t) -> x0``. Classifier-free guidance
can be applied at the ``x0`` level for any objective: each conversion is affine in ``y`` with
the same ``x_t``, so mixing ``x0`` estimates equals mixing raw predictions.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .constraints import as_constraints
from .schedules import Schedule

OBJECTIVES = ("x0", "eps", "v", "flow")
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _bc(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` to broadcast against ``x``."""
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


def _check(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


def noise_to(x0: torch.Tensor, t: torch.Tensor | float, schedule: Schedule, generator: torch.Generator | None = None,
             eps: torch.Tensor | None = None) -> torch.Tensor:
    """Forward process: ``alpha(t) x0 + sigma(t) eps`` with ``eps ~ N(0, I)`` (or the given ``eps``).

    ``t``: float or ``(B,)`` tensor.
    """
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
    if t.dim() == 0:
        t = t.expand(x0.shape[0])
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    a, s = schedule.alpha(t), schedule.sigma(t)
    return _bc(a, x0) * x0 + _bc(s, x0) * eps


def target(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: Schedule, objective: str) -> torch.Tensor:
    """What a network trained with ``objective`` should output for ``x_t = alpha x0 + sigma eps``."""
    _check(objective)
    if objective == "x0":
        return x0
    if objective == "eps":
        return eps
    if objective == "v":
        return _bc(schedule.alpha(t), x0) * eps - _bc(schedule.sigma(t), x0) * x0
    da, ds = schedule.derivatives(t)
    return _bc(da, x0) * x0 + _bc(ds, x0) * eps


def to_x0(net_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: Schedule, objective: str) -> torch.Tensor:
    """Convert a network prediction for ``objective`` to an ``x0`` estimate (table in the module docstring)."""
    _check(objective)
    if objective == "x0":
        return net_out
    a, s = _bc(schedule.alpha(t), x_t), _bc(schedule.sigma(t), x_t)
    if objective == "eps":
        return (x_t - s * net_out) / a
    if objective == "v":
        return (a * x_t - s * net_out) / (a * a + s * s)
    da, ds = (_bc(d, x_t) for d in schedule.derivatives(t))
    return (ds * x_t - s * net_out) / (a * ds - s * da)


def make_denoiser(net: Callable, schedule: Schedule, objective: str = "x0", cond: torch.Tensor | None = None) -> Denoiser:
    """``(x_t, t) -> x0`` from ``net(x_t, t, cond)`` trained with ``objective``."""
    _check(objective)
    if objective == "x0":
        return lambda x, t: net(x, t, cond)
    return lambda x, t: to_x0(net(x, t, cond), x, t, schedule, objective)


def diffusion_loss(net: Callable, x0: torch.Tensor, schedule: Schedule, objective: str = "x0",
                   cond: torch.Tensor | None = None, t: torch.Tensor | None = None,
                   weight: torch.Tensor | None = None, constraints=None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Denoising loss ``mean(weight * (net(x_t, t, cond) - target)^2)`` (a scalar).

    * ``x0``: ``(B, H, D)`` clean trajectories.
    * ``t``: ``(B,)`` noise levels (or one float for all); ``None`` draws ``t ~ U(0, 1)`` (for a
      DDPM-style discrete draw pass ``schedule.discrete(T).sample_t(B)``).
    * ``weight``: broadcastable to ``(B, H, D)``, e.g. ``(H, D)`` with Diffuser's action weight
      on step 0.
    * ``constraints``: inpainting during training as in Diffuser: the constrained entries of
      ``x_t`` are overwritten with their values (normally the clean ones) before the network
      sees them, and they are left out of the loss (the sampler overwrites them anyway).
    """
    B = x0.shape[0]
    if t is None:
        t = torch.rand(B, generator=generator, device=x0.device, dtype=x0.dtype)
    else:
        t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device).expand(B)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = noise_to(x0, t, schedule, eps=eps)
    mask = None
    constraints = as_constraints(constraints)
    if constraints is not None:
        mask, fill = constraints.dense(x_t)
        x_t = torch.where(mask, fill, x_t)
    err = (net(x_t, t, cond) - target(x0, eps, t, schedule, objective)) ** 2
    if weight is not None:
        err = err * weight
    if mask is not None:
        err = err.masked_fill(mask, 0.0)
    return err.mean()
