"""Guidance: value-gradient guidance (Diffuser) and classifier-free guidance (Decision Diffuser).

``ValueGuidance`` follows Janner et al. (2022), Alg. 1 / ``n_step_guided_p_sample``: before the
denoiser call of every solver step whose noise level satisfies ``t >= t_stopgrad``, take
``n_guide_steps`` gradient-ascent steps ``x <- x + scale * var * grad_x V(x, t)`` on the noisy
sample, re-applying the inpainting constraints after each. ``var`` is the posterior variance of
the solver step (``q(x_s | x_t, x0)``, the reference's ``model_var`` with ``scale_grad_by_std``)
when ``variance_scaled`` is on, and 1 when it is off (the default, which the shipped Diffuser
checkpoints were tuned with: a constant step at every noise level). Diffuser's locomotion
setting is ``scale=0.1, n_guide_steps=2``, variance-scaled, and no guidance for its two
least-noisy of 20 steps; with our ``t = (k + 1) / T`` convention that is ``t_stopgrad = 0.15``
(the default).

``cfg_denoiser`` is classifier-free guidance (Ho & Salimans 2022; Ajay et al. 2023) on ``x0``
estimates: ``D_u + w (D_c - D_u)`` from one batched forward over ``[cond; null_cond]``.
``w = 0`` is the unconditional model, ``w = 1`` the conditional one. Mixing ``x0`` estimates is
the same as mixing ``eps`` / ``v`` / flow predictions (every conversion is affine in the
prediction), so this works for any objective.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class ValueGuidance:
    """``value_fn(x_t (B, H, D), t (B,)) -> (B,)``; higher is better."""

    value_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scale: float = 0.1
    n_guide_steps: int = 2
    t_stopgrad: float = 0.15
    variance_scaled: bool = False  # multiply the step by the solver step's posterior variance

    def gradient(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``grad_x sum_b V(x_b, t_b)``; works inside ``torch.inference_mode`` too."""
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)  # clone: inference tensors cannot enter autograd
            value = self.value_fn(x, t.clone())
            (grad,) = torch.autograd.grad(value.sum(), x)
        return grad

    def __call__(self, x: torch.Tensor, t: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 var: float | None = None) -> torch.Tensor:
        """``n_guide_steps`` of ``x <- project(x + scale * var * grad V(x, t))``; ``var`` (a Python
        float, the step's posterior variance) is needed and used only when ``variance_scaled``."""
        step = self.scale
        if self.variance_scaled:
            if var is None:
                raise ValueError("variance_scaled guidance needs the solver step's posterior variance (var)")
            step = self.scale * var
        for _ in range(self.n_guide_steps):
            x = x + step * self.gradient(x, t).to(x.dtype)
            if project is not None:
                x = project(x)
        return x


def cfg_denoiser(denoise_cond: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 cond: torch.Tensor, null_cond: torch.Tensor, w: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x, t) -> D_u + w (D_c - D_u)`` where ``D_c, D_u = denoise_cond([x; x], [t; t], [cond; null_cond])``.

    ``cond``: ``(B, C)``; ``null_cond``: broadcastable to it (e.g. a learned or zero ``(C,)``).
    """
    both = torch.cat([cond, null_cond.to(cond).expand_as(cond)], dim=0)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        d_cond, d_uncond = denoise_cond(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return torch.lerp(d_uncond, d_cond, w)

    return denoise
