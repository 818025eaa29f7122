"""Diffusion core: schedules, objectives, solvers, constraints and guidance (pure functions).

Convention: a continuous noise level ``t in [0, 1]``, ``x_t = alpha(t) x0 + sigma(t) eps``,
``t = 0`` data. Every solver drives a denoiser ``denoise(x_t (B, H, D), t (B,)) -> x0``.
"""
from .constraints import Constraints, as_constraints
from .guidance import ValueGuidance, cfg_denoiser
from .objectives import (
    OBJECTIVES,
    diffusion_loss,
    make_denoiser,
    noise_to,
    target,
    to_x0,
)
from .schedules import DiscreteSchedule, Schedule
from .solvers import (
    SOLVERS,
    ddim,
    ddpm,
    dpmpp_2m,
    euler,
    heun,
    noise_level,
    posterior_variances,
    randn,
    sample,
    time_grid,
)

__all__ = [
    "OBJECTIVES",
    "SOLVERS",
    "Constraints",
    "DiscreteSchedule",
    "Schedule",
    "ValueGuidance",
    "as_constraints",
    "cfg_denoiser",
    "ddim",
    "ddpm",
    "diffusion_loss",
    "dpmpp_2m",
    "euler",
    "heun",
    "make_denoiser",
    "noise_level",
    "noise_to",
    "posterior_variances",
    "randn",
    "sample",
    "target",
    "time_grid",
    "to_x0",
]
