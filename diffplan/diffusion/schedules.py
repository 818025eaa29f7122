"""Noise schedules: ``x_t = alpha(t) x0 + sigma(t) eps`` for a continuous noise level ``t in [0, 1]``.

``t = 0`` is data (``alpha = 1, sigma = 0``), ``t = 1`` is (almost) pure noise. Every schedule
is a closed form in ``t``, or a DDPM ``alphas_cumprod`` table read at ``t = (k + 1) / T``:

* ``vp_cosine``: Nichol & Dhariwal (2021) eq. 17, ``alpha^2 = f(t) / f(0)``,
  ``f(t) = cos^2((t + s) / (1 + s) * pi / 2)``, ``s = 0.008``. Their ``beta <= 0.999`` clipping
  (which keeps ``x0`` recoverable at ``t = 1``) becomes a floor ``alpha >= ALPHA_MIN``, i.e.
  ``log_snr(1) = -20``, about what the clipped 1000-step table reaches.
* ``vp_linear``: the continuous limit of DDPM's ``beta = linspace(1e-4, 2e-2, 1000)`` (Song et
  al. 2021, VP SDE with ``beta(t) = 0.1 + 19.9 t``): ``alpha^2 = exp(-0.1 t - 9.95 t^2)``.
* ``scaled_linear``: Stable Diffusion / DiffusionDrive betas ``linspace(sqrt(8.5e-4),
  sqrt(1.2e-2), 1000)^2``, kept as their exact ``alphas_cumprod`` table (computed in float32
  exactly as ``diffusers`` does, so that the two agree to the last bit at the grid points).
* ``rectified_flow``: ``alpha = 1 - t, sigma = t`` (Liu et al. 2022; Lipman et al. 2022).
* ``Schedule.from_alphas_cumprod(table)`` / ``from_betas(betas)``: any DDPM table.

Discrete DDPM indices are only a view (``Schedule.discrete(T)``): the 0-based training index
``k`` (``diffusers``' ``timestep``) is the noise level ``t = (k + 1) / T``, and "the step
after the last one" (``diffusers``' ``alphas_cumprod[-1]`` for ``prev_timestep < 0``, i.e.
``alpha = 1``) is ``t = 0``. A table schedule interpolates ``log alpha^2`` linearly between
its grid points; a table of length ``T`` evaluated at ``t = (k + 1) / T`` returns its entries
exactly.

All functions take ``t`` as a float tensor (any shape; values are clamped to ``[0, 1]``) and
return tensors of the same shape, dtype and device; no host synchronisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

LOG_SNR_MIN, LOG_SNR_MAX = -20.0, 20.0  # reporting range of log_snr (finite at both ends)
ALPHA_MIN = math.exp(0.5 * LOG_SNR_MIN) / math.sqrt(1 + math.exp(LOG_SNR_MIN))  # sqrt(sigmoid(-20))


def _table_from_betas(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True, eq=False)
class Schedule:
    """A noise schedule; construct with the classmethods. ``kind`` and ``params`` rebuild it.

    Compared and hashed by identity (solvers cache per-grid coefficients per schedule object).
    """

    kind: str
    params: dict = field(default_factory=dict)
    table: torch.Tensor | None = field(default=None, repr=False, compare=False)  # log alpha^2 at t = k / T, k = 0..T

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def vp_cosine(cls, s: float = 0.008) -> Schedule:
        return cls("vp_cosine", {"s": s})

    @classmethod
    def vp_linear(cls, beta_min: float = 0.1, beta_max: float = 20.0) -> Schedule:
        """``beta(t) = beta_min + t (beta_max - beta_min)``; the defaults are DDPM's 1e-4..2e-2 over 1000 steps."""
        return cls("vp_linear", {"beta_min": beta_min, "beta_max": beta_max})

    @classmethod
    def rectified_flow(cls) -> Schedule:
        return cls("rectified_flow", {})

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, T: int = 1000) -> Schedule:
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2  # as diffusers
        table = _table_from_betas(betas).double()
        return cls._from_table("scaled_linear", {"beta_start": beta_start, "beta_end": beta_end, "T": T}, table)

    @classmethod
    def from_betas(cls, betas) -> Schedule:
        betas = torch.as_tensor(betas)
        return cls.from_alphas_cumprod(_table_from_betas(betas))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> Schedule:
        """A DDPM table ``alphas_cumprod[k]`` for training index ``k = 0..T-1`` (i.e. ``t = (k+1)/T``)."""
        ac = torch.as_tensor(alphas_cumprod).double()
        return cls._from_table("table", {"alphas_cumprod": ac.tolist()}, ac)

    @classmethod
    def _from_table(cls, kind: str, params: dict, alphas_cumprod: torch.Tensor) -> Schedule:
        if alphas_cumprod.ndim != 1 or not bool(((alphas_cumprod > 0) & (alphas_cumprod < 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D table with values in (0, 1)")
        log_ac = torch.cat([torch.zeros(1, dtype=torch.float64), alphas_cumprod.log()])  # t = 0 is data
        return cls(kind, params, log_ac)

    @classmethod
    def from_config(cls, config: dict | str) -> Schedule:
        """Inverse of ``to_config``; a bare name builds that schedule with its defaults."""
        if isinstance(config, str):
            config = {"kind": config}
        kind, params = config["kind"], dict(config.get("params", {}))
        if kind == "table":
            return cls.from_alphas_cumprod(params["alphas_cumprod"])
        return getattr(cls, kind)(**params)

    def to_config(self) -> dict:
        return {"kind": self.kind, "params": dict(self.params)}

    # --- alpha, sigma ------------------------------------------------------------------------
    def _log_alpha2(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``log alpha^2`` of a VP schedule and its derivative in ``t`` (``t`` already clamped)."""
        if self.kind == "vp_cosine":
            s = self.params["s"]
            u = (t + s) / (1 + s) * (math.pi / 2)
            log_a2 = 2 * (torch.cos(u).log() - math.log(math.cos(s / (1 + s) * math.pi / 2)))
            slope = -math.pi / (1 + s) * torch.tan(u)
            floor = 2 * math.log(ALPHA_MIN)  # Nichol & Dhariwal's clipping, see the module docstring
            return log_a2.nan_to_num(floor).clamp(floor, 0.0), torch.where(log_a2 > floor, slope, 0.0)
        if self.kind == "vp_linear":
            b0, b1 = self.params["beta_min"], self.params["beta_max"]
            return -0.5 * t * t * (b1 - b0) - t * b0, -(b0 + t * (b1 - b0))
        table = self.table.to(device=t.device, dtype=t.dtype)  # piecewise linear in t
        T = table.shape[0] - 1
        u = t * T
        lo = torch.floor(u + 1e-6).clamp(0, T - 1)  # 1e-6: t = k / T in float32 lands on grid point k
        frac = (u - lo).clamp(0.0, 1.0)
        lo = lo.long()
        a, b = table[lo], table[lo + 1]
        return torch.lerp(a, b, frac), (b - a) * T

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clamp(0.0, 1.0)
        if self.kind == "rectified_flow":
            return 1.0 - t
        return torch.exp(0.5 * self._log_alpha2(t)[0])

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clamp(0.0, 1.0)
        if self.kind == "rectified_flow":
            return t
        if self.kind == "vp_cosine":  # 1 - cos^2(u)/cos^2(u0) = sin(u - u0) sin(u + u0) / cos^2(u0): exact near t = 0
            s = self.params["s"]
            u0 = s / (1 + s) * (math.pi / 2)
            sigma2 = torch.sin(t * (math.pi / 2) / (1 + s)) * torch.sin((t + s) / (1 + s) * (math.pi / 2) + u0)
            return (sigma2 / math.cos(u0) ** 2).clamp(max=1 - ALPHA_MIN**2).sqrt()
        return torch.sqrt(-torch.expm1(self._log_alpha2(t)[0]))  # variance preserving; expm1 keeps small t exact

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.alpha(t), self.sigma(t)

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """``log(alpha^2 / sigma^2)``, clamped to ``[LOG_SNR_MIN, LOG_SNR_MAX]`` so it is finite at the ends."""
        a, s = self.alpha(t), self.sigma(t)
        return (2 * (a.log() - s.log())).clamp(LOG_SNR_MIN, LOG_SNR_MAX)

    def derivatives(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d alpha / dt, d sigma / dt)``: used by the flow objective and the euler/heun solvers.

        For VP schedules ``d sigma / dt`` is infinite at ``t = 0``; no solver evaluates it there.
        """
        t = t.clamp(0.0, 1.0)
        if self.kind == "rectified_flow":
            return -torch.ones_like(t), torch.ones_like(t)
        log_a2, slope = self._log_alpha2(t)
        a = torch.exp(0.5 * log_a2)
        da = 0.5 * slope * a
        return da, -a * da / self.sigma(t)

    # --- discrete view -----------------------------------------------------------------------
    def discrete(self, T: int) -> DiscreteSchedule:
        return DiscreteSchedule(self, T)


@dataclass(frozen=True)
class DiscreteSchedule:
    """The DDPM view of a schedule with ``T`` training steps: index ``k = 0..T-1`` is ``t = (k + 1) / T``."""

    schedule: Schedule
    T: int

    def t(self, k) -> torch.Tensor:
        """Noise level of training index ``k`` (int, list or tensor)."""
        k = torch.as_tensor(k)
        return (k.to(torch.float64 if k.dtype == torch.float64 else torch.float32) + 1) / self.T

    def index(self, t: torch.Tensor) -> torch.Tensor:
        """Nearest training index of noise level ``t`` (``-1`` for ``t = 0``, i.e. data)."""
        return (t * self.T).round().long() - 1

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device=None, low: int = 0,
                 high: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(batch,)`` noise levels of training indices drawn uniformly from ``[low, high)``.

        DDPM training is ``sample_t(B)``; DiffusionDrive's truncated training (indices below
        50 of 1000) is ``discrete(1000).sample_t(B, high=50)``.
        """
        high = self.T if high is None else high
        if generator is not None and device is None:
            device = generator.device
        k = torch.randint(low, high, (batch,), generator=generator, device=device)
        return ((k + 1).to(dtype)) / self.T

    def grid(self, timesteps) -> torch.Tensor:
        """Solver grid for a list of decreasing training indices (e.g. a ``diffusers`` scheduler's
        ``timesteps``): ``t = (k + 1) / T`` for each, then ``0`` (clean data)."""
        k = torch.as_tensor(timesteps, dtype=torch.float64)
        return torch.cat([(k + 1) / self.T, torch.zeros(1, dtype=torch.float64)])

    def leading_grid(self, steps: int) -> torch.Tensor:
        """``diffusers``' default DDIM/DDPM spacing: indices ``[(steps-1) c, ..., c, 0]``, ``c = T // steps``."""
        c = self.T // steps
        return self.grid(torch.arange(steps - 1, -1, -1) * c)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``(T,)`` float64: ``alpha(t_k)^2`` for ``k = 0..T-1``."""
        return self.schedule.alpha(self.t(torch.arange(self.T, dtype=torch.float64))) ** 2
