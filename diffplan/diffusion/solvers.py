"""Samplers over an ``x0`` denoiser, in the style of k-diffusion's ``sampling.py``.

Every solver is ``solver(denoise, x, ts, schedule, ...) -> x`` where

* ``denoise(x_t (B, H, D), t (B,)) -> x0 estimate (B, H, D)`` (see ``objectives.make_denoiser``),
* ``x`` is the sample at noise level ``ts[0]``,
* ``ts`` is the decreasing noise-level grid ``(n + 1,)``; the solver takes ``n`` steps and
  returns the sample at ``ts[-1]`` (``0``: clean). Truncated sampling, warm starts and
  ``diffusers``-style discrete grids are all just other grids.

Stochastic steps (``ddpm``, ``ddim`` with ``eta > 0``) draw their noise with :func:`randn`: from one
``generator``, or from one generator per env (a list), so that an env's plan does not depend on
the batch it is planned in.

Optional hooks, both plain callables: ``guide(x, i) -> x`` runs before the (first) denoiser call
of step ``i``; ``constrain(x) -> x`` runs after every step (inpainting). ``sample()`` builds them.

Each solver's per-step coefficients depend only on the schedule and the grid: they are computed
once on the host in float64 (one batch of tensor ops), cached (``functools.lru_cache``, keyed on
the schedule object and the grid as a tuple of floats), and enter the loop as Python floats. The
loop is tensor arithmetic on ``x`` only: no host synchronisation, no Python branching on tensor
values, no per-step allocation beyond the step's results, so it can be captured by
``torch.compile`` or a CUDA graph, and it runs on any device and dtype. Notation: step ``i`` goes
from ``t = ts[i]`` to ``s = ts[i + 1]``; ``alpha_t, sigma_t`` etc. are the schedule there.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from .constraints import as_constraints
from .schedules import Schedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Hook = Callable[..., torch.Tensor] | None


# --- shared pieces ------------------------------------------------------------------------------
Grid = tuple  # decreasing noise levels as Python floats
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape, generator: Generators = None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise of ``shape`` ``(B, ...)``.

    ``generator``: one generator (None: torch's global one), or a sequence of ``G`` generators, one
    per env, where ``G`` divides ``B``: env ``g`` fills the rows ``[g B/G, (g+1) B/G)`` from its own
    (CPU) generator in float32, so its noise is the same whatever else is in the batch.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    shape = tuple(shape)
    if not generator or shape[0] % len(generator):
        raise ValueError(f"{len(generator)} generators cannot fill a batch of {shape[0]} rows")
    rows = (shape[0] // len(generator), *shape[1:])
    return torch.cat([torch.randn(rows, generator=g) for g in generator]).to(device=device, dtype=dtype)


def as_grid(ts) -> Grid:
    """A grid as a hashable tuple of floats (a device tensor is read once, before any loop)."""
    if isinstance(ts, tuple):
        return ts
    return tuple(torch.as_tensor(ts, dtype=torch.float64).reshape(-1).tolist())


@functools.lru_cache(maxsize=512)
def _on_grid(schedule: Schedule, ts: Grid):
    """``(t, alpha, sigma)`` as float64 CPU tensors."""
    t = torch.tensor(ts, dtype=torch.float64)
    return t, schedule.alpha(t), schedule.sigma(t)


def _floats(*coefs: torch.Tensor):
    return tuple(tuple(c.tolist()) for c in coefs)


def _batch_times(ts: Grid, x: torch.Tensor):
    """``ts[i]`` as ``(B,)`` tensors for the denoiser, filled on the device (no host copy, so a CUDA
    graph can capture them); at least float32, so that half-precision samples still pass exact
    noise levels (discrete indices survive)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return [torch.full((x.shape[0],), t, dtype=dtype, device=x.device) for t in ts]


def _first_order(denoise: Denoiser, x: torch.Tensor, ts: Grid, k_x, k_d, k_z=None, generator: Generators = None,
                 guide: Hook = None, constrain: Hook = None) -> torch.Tensor:
    """The loop every one-evaluation-per-step solver shares: ``x <- k_x x + k_d D(x, t) + k_z z``."""
    times = _batch_times(ts, x)
    for i in range(len(k_x)):
        if guide is not None:
            x = guide(x, i)
        x = torch.add(k_x[i] * x, denoise(x, times[i]), alpha=k_d[i])
        if k_z is not None:
            x = torch.add(x, randn(x.shape, generator, x.device, x.dtype), alpha=k_z[i])
        if constrain is not None:
            x = constrain(x)
    return x


# --- solvers ------------------------------------------------------------------------------------
def ddpm(denoise: Denoiser, x: torch.Tensor, ts, schedule: Schedule, generator: Generators = None,
         guide: Hook = None, constrain: Hook = None) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior ``q(x_s | x_t, x0 = D(x_t))`` (Ho et al. 2020, eqs. 6-7).

    For a general ``(alpha, sigma)`` schedule (Kingma et al. 2021, eqs. 31-34) with
    ``alpha_ts = alpha_t / alpha_s`` and ``sigma2_ts = sigma_t^2 - alpha_ts^2 sigma_s^2``:
    ``mean = alpha_ts sigma_s^2 / sigma_t^2 x_t + alpha_s sigma2_ts / sigma_t^2 x0``,
    ``var = sigma2_ts sigma_s^2 / sigma_t^2`` ("fixed small" variance). Identical to
    ``ddim(eta=1)`` and to ``diffusers.DDPMScheduler`` on the same grid.
    """
    ts = as_grid(ts)
    return _first_order(denoise, x, ts, *ddpm_coefficients(schedule, ts), generator, guide, constrain)


@functools.lru_cache(maxsize=512)
def ddpm_coefficients(schedule: Schedule, ts: Grid):
    _, a, s = _on_grid(schedule, ts)
    a_t, s_t, a_s, s_s = a[:-1], s[:-1], a[1:], s[1:]
    alpha_ts = a_t / a_s
    sigma2_ts = (s_t**2 - alpha_ts**2 * s_s**2).clamp(min=0)
    k_x = alpha_ts * s_s**2 / s_t**2
    k_d = a_s * sigma2_ts / s_t**2
    k_z = (sigma2_ts * s_s**2 / s_t**2).sqrt()
    return _floats(k_x, k_d, k_z)


@functools.lru_cache(maxsize=512)
def posterior_variances(schedule: Schedule, ts: Grid) -> tuple[float, ...]:
    """Per step ``t -> s`` of the grid: the variance of the DDPM posterior ``q(x_s | x_t, x0)``,
    ``sigma2_ts sigma_s^2 / sigma_t^2`` (0 on a step that lands on ``sigma = 0``). Python floats:
    what variance-scaled value guidance multiplies its step by (Diffuser's ``model_var``)."""
    return tuple(k * k for k in ddpm_coefficients(schedule, ts)[2])


def ddim(denoise: Denoiser, x: torch.Tensor, ts, schedule: Schedule, eta: float = 0.0,
         generator: Generators = None, guide: Hook = None, constrain: Hook = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): ``x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps_hat + c z``.

    ``eps_hat = (x_t - alpha_t x0) / sigma_t`` and ``c = eta * sqrt(var of q(x_s | x_t, x0))``
    (eq. 16, written for any schedule): ``eta = 0`` is the deterministic probability-flow
    sampler (first-order exponential integrator), ``eta = 1`` is DDPM.
    """
    ts = as_grid(ts)
    k_x, k_d, k_z = ddim_coefficients(schedule, ts, float(eta))
    return _first_order(denoise, x, ts, k_x, k_d, k_z if eta > 0 else None, generator, guide, constrain)


@functools.lru_cache(maxsize=512)
def ddim_coefficients(schedule: Schedule, ts: Grid, eta: float):
    _, a, s = _on_grid(schedule, ts)
    a_t, s_t, a_s, s_s = a[:-1], s[:-1], a[1:], s[1:]
    c = eta * (s_s / s_t) * (s_t**2 - (a_t * s_s / a_s) ** 2).clamp(min=0).sqrt()
    k_x = (s_s**2 - c**2).clamp(min=0).sqrt() / s_t
    k_d = a_s - k_x * a_t
    return _floats(k_x, k_d, c)


def dpmpp_2m(denoise: Denoiser, x: torch.Tensor, ts, schedule: Schedule, lower_order_final: bool = True,
             guide: Hook = None, constrain: Hook = None) -> torch.Tensor:
    """DPM-Solver++(2M), data prediction (Lu et al. 2022, Alg. 2), as in ``diffusers`` ``dpmsolver++`` order 2.

    With ``lambda = log(alpha / sigma)``, ``h_i = lambda_s - lambda_t`` and ``r_i = h_{i-1} / h_i``:
    ``x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h_i} - 1) D_hat``,
    ``D_hat = (1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_{i-1}``.
    The first step is first order (``D_hat = D_0``); so is a step that lands on ``sigma = 0``
    (``h = inf``), and, with ``lower_order_final``, the last step when there are fewer than 15
    (the stabilisation of Lu et al. sec. 5 / ``diffusers``' ``lower_order_final``).
    """
    ts = as_grid(ts)
    k_x, k_d, q = dpmpp_2m_coefficients(schedule, ts, lower_order_final)
    times = _batch_times(ts, x)
    d_prev = None
    for i in range(len(k_x)):
        if guide is not None:
            x = guide(x, i)
        d = denoise(x, times[i])
        d_hat = d if d_prev is None else torch.lerp(d, d_prev, -q[i])  # (1 + q) d - q d_prev
        x = torch.add(k_x[i] * x, d_hat, alpha=k_d[i])
        d_prev = d
        if constrain is not None:
            x = constrain(x)
    return x


@functools.lru_cache(maxsize=512)
def dpmpp_2m_coefficients(schedule: Schedule, ts: Grid, lower_order_final: bool = True):
    _, a, s = _on_grid(schedule, ts)
    n = len(ts) - 1
    lam = a.log() - s.log()
    h = lam[1:] - lam[:-1]
    k_x = s[1:] / s[:-1]
    k_d = a[1:] - s[1:] * a[:-1] / s[:-1]  # = -alpha_s (e^{-h} - 1), exact also at sigma_s = 0
    q = torch.cat([torch.zeros_like(h[:1]), h[1:] / (2 * h[:-1])])  # 1 / (2 r_i)
    q = torch.where(s[1:] > 0, q, torch.zeros_like(q))
    if lower_order_final and n < 15:
        q[-1] = 0.0
    return _floats(k_x, k_d, q)


@functools.lru_cache(maxsize=512)
def ode_coefficients(schedule: Schedule, ts: Grid):
    """Probability-flow ODE ``dx/dt = alpha' D + sigma' (x - alpha D) / sigma = p x + q D`` on the grid."""
    t, a, s = _on_grid(schedule, ts)
    da, ds = schedule.derivatives(t)
    p = ds / s
    return _floats(p, da - a * p, t[1:] - t[:-1])


def euler(denoise: Denoiser, x: torch.Tensor, ts, schedule: Schedule, guide: Hook = None,
          constrain: Hook = None) -> torch.Tensor:
    """Euler steps in ``t`` on the probability-flow ODE ``dx/dt = alpha' D + sigma' (x - alpha D) / sigma``.

    For rectified flow this is the usual flow sampler ``x <- x + (s - t) v`` with
    ``v = (x - D) / t`` (and coincides with DDIM). For VP schedules it works too but is much
    less accurate per step than ``ddim`` / ``dpmpp_2m``, which integrate the linear part exactly.
    """
    ts = as_grid(ts)
    p, q, dt = ode_coefficients(schedule, ts)
    k_x = [1 + h * p_i for h, p_i in zip(dt, p)]
    k_d = [h * q_i for h, q_i in zip(dt, q)]
    return _first_order(denoise, x, ts, k_x, k_d, guide=guide, constrain=constrain)


def heun(denoise: Denoiser, x: torch.Tensor, ts, schedule: Schedule, guide: Hook = None,
         constrain: Hook = None) -> torch.Tensor:
    """Heun's 2nd-order method in ``t`` on the same ODE as ``euler`` (Karras et al. 2022, Alg. 1, no churn).

    Every step but the last is Euler followed by the trapezoidal correction with the
    derivative at ``s``; the last step is Euler, because it usually lands on ``sigma = 0``
    where the derivative is undefined (EDM does the same). ``2n - 1`` denoiser calls. The
    constraints are applied to the Euler predictor too; guidance only before the first call.
    """
    ts = as_grid(ts)
    p, q, dt = ode_coefficients(schedule, ts)
    n = len(dt)
    times = _batch_times(ts, x)
    for i in range(n):
        if guide is not None:
            x = guide(x, i)
        d = torch.add(p[i] * x, denoise(x, times[i]), alpha=q[i])
        x_euler = torch.add(x, d, alpha=dt[i])
        if i < n - 1:
            if constrain is not None:
                x_euler = constrain(x_euler)
            d_next = torch.add(p[i + 1] * x_euler, denoise(x_euler, times[i + 1]), alpha=q[i + 1])
            x = torch.add(x, d + d_next, alpha=dt[i] / 2)
        else:
            x = x_euler
        if constrain is not None:
            x = constrain(x)
    return x


SOLVERS = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m, "euler": euler, "heun": heun}


# --- the entry point --------------------------------------------------------------------------
def _uniform(steps: int, t_start: float, t_end: float) -> Grid:
    return tuple(t_start + (t_end - t_start) * i / steps for i in range(steps + 1))


def time_grid(steps: int, t_start: float = 1.0, t_end: float = 0.0, device=None,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The default grid as a tensor: ``t_i = t_start + (t_end - t_start) i / steps``, ``i = 0..steps``."""
    return torch.tensor(_uniform(steps, float(t_start), float(t_end)), device=device, dtype=dtype)


@functools.lru_cache(maxsize=512)
def noise_level(schedule: Schedule, t: float) -> tuple[float, float]:
    """``(alpha(t), sigma(t))`` as Python floats, cached per schedule and level: for noising a prior
    to ``t_start`` without tensor work on a planner's hot path."""
    tt = torch.tensor([t], dtype=torch.float64)
    return schedule.alpha(tt).item(), schedule.sigma(tt).item()


def sample(denoise: Denoiser, x_init: torch.Tensor, schedule: Schedule, solver: str = "dpmpp_2m", steps: int = 10,
           t_start: float = 1.0, t_end: float = 0.0, constraints=None, guidance=None,
           generator: Generators = None, noise_prior: bool = True, eta: float | None = None,
           ts=None) -> torch.Tensor:
    """Sample ``x0 (B, H, D)`` with ``solver`` on the grid ``time_grid(steps, t_start, t_end)`` (uniform in ``t``).

    * Start: ``noise_prior=True`` and ``t_start >= 1``: pure noise ``sigma(1) eps`` (``x_init``
      only gives shape, dtype, device). ``noise_prior=True`` and ``t_start < 1``: ``x_init`` is a
      prior (anchor, draft, previous plan), noised to ``alpha(t_start) x_init + sigma(t_start) eps``.
      ``noise_prior=False``: ``x_init`` is already the sample at ``t_start``.
    * ``steps == 0``: returns ``x_init`` with the constraints applied.
    * ``constraints``: a ``Constraints`` (or a list), applied to the start and after every step.
    * ``guidance``: a ``ValueGuidance``, applied before the denoiser call of each step with
      ``t >= guidance.t_stopgrad``; a ``variance_scaled`` one gets the step's
      :func:`posterior_variances` entry (host floats, no synchronisation).
    * ``eta``: DDIM's stochasticity (``solver="ddim"`` only; default 0).
    * ``generator``: makes the start noise and the ddpm/ddim noise reproducible; a list of one
      generator per env (see :func:`randn`) makes each env's sample independent of the batch.
    * ``ts``: an explicit decreasing grid, tensor or sequence (e.g.
      ``schedule.discrete(T).grid(diffusers_timesteps)``), overriding ``steps, t_start, t_end``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(SOLVERS)}")
    if eta is not None and solver != "ddim":
        raise ValueError(f"eta applies to solver='ddim' only, not {solver!r}")
    if x_init.dim() != 3:
        raise ValueError(f"x_init must be (B, H, D), got shape {tuple(x_init.shape)}")
    constraints = as_constraints(constraints)
    constrain = None
    if constraints is not None:
        mask, fill = constraints.dense(x_init)

        def constrain(x):
            return torch.where(mask, fill, x)

    if ts is None:
        if steps == 0:
            return x_init if constrain is None else constrain(x_init)
        if not 0.0 <= t_end < t_start <= 1.0:
            raise ValueError(f"need 0 <= t_end < t_start <= 1, got t_start={t_start}, t_end={t_end}")
        ts = _uniform(steps, float(t_start), float(t_end))
    else:
        ts = as_grid(ts)
        if len(ts) < 2:
            return x_init if constrain is None else constrain(x_init)

    x = x_init
    if noise_prior:
        eps = randn(x_init.shape, generator, x_init.device, x_init.dtype)
        a0, s0 = noise_level(schedule, ts[0])
        x = s0 * eps if ts[0] >= 1 else torch.add(a0 * x_init, eps, alpha=s0)
    if constrain is not None:
        x = constrain(x)

    guide = None
    if guidance is not None:
        active = [t >= guidance.t_stopgrad for t in ts[:-1]]
        times = _batch_times(ts, x)
        var = posterior_variances(schedule, ts) if getattr(guidance, "variance_scaled", False) else [None] * len(active)

        def guide(x, i):
            return guidance(x, times[i], constrain, var=var[i]) if active[i] else x

    kwargs = {"generator": generator} if solver in ("ddpm", "ddim") else {}
    if eta is not None:
        kwargs["eta"] = eta
    return SOLVERS[solver](denoise, x, ts, schedule, guide=guide, constrain=constrain, **kwargs)
