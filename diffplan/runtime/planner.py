"""The real-time planning loop that every policy's ``act`` goes through.

It knows no policy. It drives any object that can make a plan from an observation (a
:class:`Plannable`) and read an action off a plan, and adds what a control loop needs:

* an action queue: execute ``n_action_steps`` of a plan, then replan (Diffusion Policy's queue,
  Diffuser's receding horizon; ``n_action_steps=1`` replans every step);
* warm start: the next plan starts from the previous one, shifted by the executed steps with its
  last step repeated, noised to ``t_warm`` and refined in ``warm_steps`` solver steps;
* a latency budget: the number of solver steps that fits ``budget_ms``, from per-step costs
  measured once per batch size (anytime planning);
* batching: one call serves a whole vector env; every env keeps its own plan, queue position
  and noise generator, and ``reset(mask)`` restarts only the envs that ended;
* CUDA graphs (``cuda_graph``): every plan is replayed from a capture per (batch size, step
  count, cold or warm), see :mod:`diffplan.runtime.graphs`; eager on CPU.
"""
from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from diffplan.diffusion.solvers import Generators, randn
from diffplan.runtime.graphs import PlanGraphs


class Plannable(Protocol):
    """What the planner needs from a policy."""

    plan_shape: tuple[int, int]  # (H, D) of one plan
    default_steps: int  # solver steps of a cold plan
    # Optional ``noise_samples: int`` (default 1): candidate plans per env. With n > 1 the planner
    # passes noise (B, n, H, D), every candidate drawn from its env's own generator.

    def plan(self, obs: torch.Tensor, goal: torch.Tensor | None, noise: torch.Tensor, *,
             warm: torch.Tensor | None = None, t_start: float = 1.0,
             steps: int | None = None, generator: Generators = None) -> torch.Tensor:
        """obs: (B, obs_dim) normalized or raw as the policy likes; noise: (B, H, D) standard normal
        ((B, n, H, D) for a policy with ``noise_samples = n > 1``).
        warm: (B, H, D) previous plan shifted to the present, to be noised to ``t_start``.
        generator: one per env (the planner's); every further random draw of a plan (stochastic
        solver steps, sampling a candidate) comes from it, e.g. with ``diffusion.randn``.
        Returns plans (B, H, D)."""

    def action_at(self, plans: torch.Tensor, index: torch.Tensor, obs: torch.Tensor,
                  goal: torch.Tensor | None) -> torch.Tensor:
        """The action to execute now: (B, act_dim), for envs at position ``index`` (B,) in their plans."""


@dataclass
class PlannerConfig:
    n_action_steps: int = 1  # actions executed from a plan before replanning
    steps: int | None = None  # solver steps of a cold plan (None: the policy's default)
    warm_start: bool = False  # start replans from the shifted previous plan
    t_warm: float = 0.3  # noise level the shifted plan is noised to
    warm_steps: int = 2  # solver steps of a warm replan
    budget_ms: float | None = None  # pick the step count that fits this latency
    min_steps: int = 1
    max_steps: int = 256
    seed: int | None = None  # per-env noise generators are seeded from (seed, env index)
    compile: bool = False  # torch.compile the policy's denoiser for planning (fixed shapes)
    dtype: str | None = None  # inference autocast dtype: "bfloat16" or "float16" (None: float32)
    cuda_graph: bool = False  # replay plans from CUDA graphs (CUDA only; eager elsewhere)
    cuda_graph_batches: list[int] | None = None  # batch sizes to capture (None: any, up to 16 graphs)

    def __post_init__(self):
        if self.n_action_steps < 1:
            raise ValueError(f"n_action_steps must be >= 1, got {self.n_action_steps}")
        if not 0.0 < self.t_warm <= 1.0:
            raise ValueError(f"t_warm must be in (0, 1], got {self.t_warm}")
        if self.dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"dtype must be None, 'bfloat16' or 'float16', got {self.dtype!r}")
        if self.warm_steps < 0 or self.min_steps < 1 or self.max_steps < self.min_steps:
            raise ValueError("need warm_steps >= 0 and 1 <= min_steps <= max_steps")


class Planner:
    """Receding-horizon executor of a :class:`Plannable` over a batch of environments."""

    def __init__(self, policy: Plannable, config: PlannerConfig | None = None):
        self.policy = policy
        self.config = config or PlannerConfig()
        self._plans: torch.Tensor | None = None  # (B, H, D)
        self._index = np.zeros(0, dtype=np.int64)  # position of each env in its plan
        self._valid = np.zeros(0, dtype=bool)  # env has a plan it may continue or warm-start from
        self._generators: list[torch.Generator] = []  # one per env: every random draw of its plans
        self._seed: int | list[int] | None = None  # the last reset(seed=...)
        self._reseed = False  # reseed the generators on the next act
        self._cost: dict[tuple[int, bool], tuple[float, float]] = {}  # (B, warm) -> (fixed_ms, per_step_ms)
        self.latencies_ms: collections.deque[float] = collections.deque(maxlen=10_000)
        self.last_latency_ms = 0.0
        self.last_steps = 0  # solver steps of the last replan (0 when the call did not replan)
        self.num_plans = 0  # replans made since construction (each counts once per call)
        self.graphs = PlanGraphs(batches=self.config.cuda_graph_batches)  # used with config.cuda_graph

    # ---------------------------------------------------------------- episode bookkeeping
    def reset(self, mask: Sequence[bool] | np.ndarray | None = None,
              seed: int | Sequence[int] | None = None) -> None:
        """Forget plans: all of them (``mask=None``), or those of the envs where ``mask`` is true.

        ``seed`` reseeds the noise generators: an int gives env ``i`` the seed ``seed + i``, a
        list gives one seed per env. Without it, generators continue their streams (initially
        seeded from ``config.seed`` and the env index). The seed is kept: when the batch size
        changes, the new generators are seeded from it again, never from OS entropy.
        """
        if seed is not None:
            self._seed = int(seed) if np.isscalar(seed) else [int(v) for v in seed]
            self._reseed = True
        if mask is None:
            self._plans = None
            self._valid = np.zeros(0, dtype=bool)
            return
        mask = np.asarray(mask, dtype=bool).reshape(-1)
        if self._plans is None:
            return
        if mask.shape[0] != self._valid.shape[0]:
            raise ValueError(f"reset mask has {mask.shape[0]} entries but the planner serves "
                             f"{self._valid.shape[0]} envs")
        self._valid[mask] = False
        if self._reseed:
            for i in np.flatnonzero(mask):
                self._generators[i].manual_seed(self._env_seed(i))
            self._reseed = False

    def _env_seed(self, i: int) -> int | None:
        """Env ``i``'s noise seed: from the last ``reset(seed=...)``, else from ``config.seed``
        (None: unseeded)."""
        if isinstance(self._seed, list):
            if i >= len(self._seed):
                raise ValueError(f"reset got {len(self._seed)} seeds for a batch of more envs")
            return self._seed[i]
        if self._seed is not None:
            return self._seed + i
        return None if self.config.seed is None else int(self.config.seed) * 1_000_003 + i

    def _ensure_batch(self, batch: int, device: torch.device) -> None:
        if self._plans is None or self._plans.shape[0] != batch or self._plans.device != device:
            h, d = self.policy.plan_shape
            self._plans = torch.zeros(batch, h, d, device=device)
            self._index = np.zeros(batch, dtype=np.int64)
            self._valid = np.zeros(batch, dtype=bool)
        if len(self._generators) != batch or self._reseed:
            seeds = [self._env_seed(i) for i in range(batch)]
            self._generators = [torch.Generator(device="cpu") for _ in range(batch)]
            for g, sd in zip(self._generators, seeds):
                g.manual_seed(sd) if sd is not None else g.seed()
            self._reseed = False

    # ---------------------------------------------------------------- acting
    def act(self, obs: torch.Tensor, goal: torch.Tensor | None = None,
            budget_ms: float | None = None) -> torch.Tensor:
        """One control step for a batch: obs (B, obs_dim) -> actions (B, act_dim)."""
        t0 = time.perf_counter()
        batch = obs.shape[0]
        self._ensure_batch(batch, obs.device)
        cfg = self.config
        need = ~self._valid | (self._index >= cfg.n_action_steps)
        self.last_steps = 0
        if need.any():
            budget = budget_ms if budget_ms is not None else cfg.budget_ms
            warm = need & self._valid if cfg.warm_start else np.zeros_like(need)
            cold = need & ~warm
            for group, is_warm in ((cold, False), (warm, True)):
                if group.any():
                    self._replan(np.flatnonzero(group), obs, goal, is_warm, budget)
        idx = torch.as_tensor(self._index, device=obs.device)
        action = self.policy.action_at(self._plans, idx, obs, goal)
        self._index += 1
        if obs.device.type == "cuda":
            torch.cuda.synchronize(obs.device)
        self.last_latency_ms = (time.perf_counter() - t0) * 1e3
        self.latencies_ms.append(self.last_latency_ms)
        return action

    def _replan(self, rows: np.ndarray, obs, goal, warm: bool, budget_ms: float | None) -> None:
        cfg = self.config
        all_rows = rows.shape[0] == obs.shape[0]
        sel = slice(None) if all_rows else torch.as_tensor(rows, device=obs.device)
        steps = self._steps_for(len(rows), warm, budget_ms, obs, goal)
        noise = self._noise(rows, obs.device, obs.dtype)
        kwargs = {}
        if warm:
            prev = self._plans[sel]
            stride = getattr(self.policy, "plan_stride", 1)  # env steps per plan state
            k = torch.as_tensor(self._index[rows] // stride, device=obs.device)
            kwargs = dict(warm=shift_plans(prev, k), t_start=cfg.t_warm)
        plans = self._plan(obs[sel], None if goal is None else goal[sel], noise, steps=steps,
                           generator=[self._generators[i] for i in rows], **kwargs)
        self._plans[sel] = plans
        self._index[rows] = 0
        self._valid[rows] = True
        self.last_steps = max(self.last_steps, steps)
        self.num_plans += 1

    def _plan(self, obs, goal, noise, **kwargs) -> torch.Tensor:
        """``policy.plan``, or its CUDA-graph replay with ``config.cuda_graph``."""
        if self.config.cuda_graph:
            return self.graphs.plan(self.policy, obs, goal, noise, **kwargs)
        return self.policy.plan(obs, goal, noise, **kwargs)

    def _noise_shape(self) -> tuple[int, ...]:
        """One env's noise: (H, D), or (n, H, D) for a policy planning n candidates per env."""
        n = getattr(self.policy, "noise_samples", 1)
        return tuple(self.policy.plan_shape) if n == 1 else (n, *self.policy.plan_shape)

    def _noise(self, rows: np.ndarray, device, dtype) -> torch.Tensor:
        return randn((len(rows), *self._noise_shape()), [self._generators[i] for i in rows], device, dtype)

    # ---------------------------------------------------------------- latency budget
    def _steps_for(self, batch: int, warm: bool, budget_ms: float | None, obs, goal) -> int:
        cfg = self.config
        base = cfg.warm_steps if warm else (self.policy.default_steps if cfg.steps is None else cfg.steps)
        if budget_ms is None:
            return base
        fixed, per_step = self.measure_cost(batch, warm, obs, goal)
        fits = math.floor((budget_ms - fixed) / max(per_step, 1e-6))
        return int(min(max(fits, cfg.min_steps), cfg.max_steps))

    def measure_cost(self, batch: int, warm: bool, obs: torch.Tensor | None = None,
                     goal: torch.Tensor | None = None, repeats: int = 5) -> tuple[float, float]:
        """Per-plan fixed cost and per-solver-step cost in ms at this batch size (cached).

        Timed as the median of ``repeats`` plans at 1 and at 5 steps; the difference gives the
        per-step cost and the rest is fixed (drafting, normalization, action extraction).
        """
        key = (batch, warm)
        if key in self._cost:
            return self._cost[key]
        if obs is None:
            raise ValueError("measure_cost needs an example observation the first time")
        rows = np.arange(batch) % obs.shape[0]
        o = obs[torch.as_tensor(rows, device=obs.device)]
        g = None if goal is None else goal[torch.as_tensor(rows, device=goal.device)]
        noise = torch.randn(batch, *self._noise_shape(), device=obs.device, dtype=obs.dtype)
        kwargs = {}
        if warm:
            kwargs = dict(warm=torch.zeros(batch, *self.policy.plan_shape, device=obs.device, dtype=obs.dtype),
                          t_start=self.config.t_warm)

        def timed(steps: int) -> float:
            out = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                self._plan(o, g, noise, steps=steps, **kwargs)
                if obs.device.type == "cuda":
                    torch.cuda.synchronize(obs.device)
                out.append((time.perf_counter() - t0) * 1e3)
            return float(np.median(out[1:]))  # the first call warms caches

        t1, t5 = timed(1), timed(5)
        per_step = max((t5 - t1) / 4.0, 1e-3)
        fixed = max(t1 - per_step, 0.0)
        self._cost[key] = (fixed, per_step)
        return self._cost[key]

    def latency_stats(self) -> dict[str, float]:
        """p50 / p99 / mean of the recorded ``act`` latencies in ms."""
        if not self.latencies_ms:
            return {"p50_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan")}
        a = np.asarray(self.latencies_ms)
        return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
                "mean_ms": float(a.mean())}


def shift_plans(plans: torch.Tensor, executed: torch.Tensor) -> torch.Tensor:
    """Shift each plan (B, H, D) left by its executed step count (B,), repeating the last step.

    Step ``i`` of the result is step ``min(i + executed, H - 1)`` of the old plan: the part not yet
    executed moves to the front, and the tail is extended by holding the final state.
    """
    h = plans.shape[1]
    src = (torch.arange(h, device=plans.device)[None, :] + executed[:, None]).clamp_(max=h - 1)
    return torch.gather(plans, 1, src[:, :, None].expand(-1, -1, plans.shape[2]))
