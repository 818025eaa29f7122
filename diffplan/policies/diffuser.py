"""Diffuser: planning by diffusing whole trajectories (Janner et al., ICML 2022).

What it trains
    A temporal U-Net denoises normalized trajectory windows of horizon H. For mazes the
    trajectory is the state sequence ``[x, y, vx, vy]``; for locomotion it is ``[obs, action]``.
    The first state (and, for goal tasks, the last) is inpainted during training as at test time.
    For reward tasks a value network ``V(x_t, t)`` learns the discounted return of the window.

How it acts
    Each plan starts from noise (or from the previous plan: see ``diffplan.runtime``), with the
    current state inpainted at step 0 and ``[goal, 0, 0]`` at step H-1 for goal tasks, and is
    denoised by any solver. Actions come from
      * ``pd``: Diffuser's maze tracking controller ``a = (wp_xy - xy) + (wp_vel - vel)`` toward the
        next waypoint (REFERENCES: tracking is what made Diffuser's maze scores);
      * ``plan``: the diffused action at the current step (locomotion, ``[obs, action]`` plans);
    with value guidance (gradient steps on V; at ``temperature > 0``, ``n_samples`` plans and the
    best by V kept) for reward tasks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from diffplan.data import GaussianNormalizer, LimitsNormalizer, SequenceWindows
from diffplan.diffusion import (
    Constraints,
    Schedule,
    ValueGuidance,
    diffusion_loss,
    make_denoiser,
    noise_level,
    randn,
    sample,
)
from diffplan.nn import TemporalUNet
from diffplan.policies.base import PolicyBase, SpaceSpec, register_policy
from diffplan.runtime.planner import PlannerConfig

SCHEDULES = {"vp_cosine": Schedule.vp_cosine, "vp_linear": Schedule.vp_linear,
             "rectified_flow": Schedule.rectified_flow}


@dataclass
class DiffuserConfig:
    horizon: int = 128  # states in a plan
    # env steps between consecutive plan states: a plan of H keypoints spans (H - 1) * stride + 1
    # steps, and PD tracking follows the keypoints linearly interpolated (action_mode pd only)
    plan_stride: int = 1
    with_actions: bool = False  # diffuse [obs, action] (locomotion) instead of states only (mazes)
    dim: int = 32
    dim_mults: tuple[int, ...] = (1, 2, 4)
    schedule: str = "vp_cosine"
    objective: str = "x0"
    solver: str = "ddim"
    steps: int = 10  # solver steps of a cold plan
    normalizer: str = "limits"  # "limits" (mazes) or "gaussian" (locomotion)
    pad: bool = True  # train on windows that run past the episode end, padded to rest at the goal
    inpaint_goal: bool = True  # goal tasks: inpaint [goal, 0, ..] at H-1 (False: start only, goal-agnostic)
    action_mode: str = "pd"  # "pd" | "plan"
    kp: float = 1.0  # PD tracking gains on position and velocity error
    kd: float = 1.0
    track_speed: float = 1.0  # PD tracking runs through the plan this many times faster than planned
    action_weight: float = 10.0  # loss weight of the first action (with_actions only)
    # value guidance (reward tasks)
    value_guided: bool = False
    discount: float = 0.997
    n_samples: int = 64
    # step size on grad V, where V is the window's return divided by value_scale (the data's largest
    # |return|, ~1000 on locomotion): Diffuser's 0.1 on raw returns is ~100 here. 1-3 is the range
    # tuned on locomotion; 0.1 barely moves a plan, and 30 overshoots.
    guide_scale: float = 3.0
    n_guide_steps: int = 2
    t_stopgrad: float = 0.1
    # scale each guidance step by the solver step's posterior variance, as Diffuser's
    # n_step_guided_p_sample does (False: a constant step, what the shipped checkpoints were tuned with)
    guide_variance: bool = False
    # added to the reward of an episode's terminal step before the value target is computed
    # (Diffuser: -100, teaching V that falling is bad); None: no penalty, as the shipped value nets
    termination_penalty: float | None = None
    # scale of the noise a plan starts from (DDIM's only noise). 1 samples the data's behavior,
    # exploration noise included; < 1 moves toward its typical plan; 0 plans deterministically
    # from the zero start: then n_samples is ignored and one plan is made (all candidates would be equal)
    temperature: float = 1.0
    # a `kind: critic` checkpoint: of the n_samples candidate plans (temperature > 0), keep the one
    # whose first action has the highest Q(s, a) (None: the highest V, with value guidance)
    critic: str | None = None
    runtime: PlannerConfig = field(default_factory=lambda: PlannerConfig(n_action_steps=100_000))

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} unknown; choose from {sorted(SCHEDULES)}")
        if self.action_mode not in ("pd", "plan"):
            raise ValueError(f"action_mode must be 'pd' or 'plan', got {self.action_mode!r}")
        if self.action_mode == "plan" and not self.with_actions:
            raise ValueError("action_mode='plan' needs with_actions=True (actions must be in the plan)")
        check_tracking(self.plan_stride, self.track_speed, self.action_mode)
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")


class ValueNet(nn.Module):
    """V(x_t, t): the discounted return of a (noisy) normalized window, for gradient guidance."""

    def __init__(self, horizon: int, dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(horizon * dim + 1, hidden), nn.Mish(),
                                 nn.Linear(hidden, hidden), nn.Mish(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x.flatten(1), t[:, None]], dim=1)).squeeze(-1)


@register_policy
class DiffuserPlanner(PolicyBase):
    kind = "diffuser"
    Config = DiffuserConfig

    def __init__(self, config: DiffuserConfig, spec: SpaceSpec):
        super().__init__(config, spec)
        self.obs_dim, self.act_dim = spec.obs_dim, spec.act_dim
        self.dim = spec.obs_dim + (spec.act_dim if config.with_actions else 0)
        self.plan_shape = (config.horizon, self.dim)
        self.schedule = SCHEDULES[config.schedule]()
        norm = LimitsNormalizer if config.normalizer == "limits" else GaussianNormalizer
        self.normalizer = norm(self.dim)
        self.net = TemporalUNet(self.dim, dim=config.dim, dim_mults=config.dim_mults)
        self.value = ValueNet(config.horizon, self.dim) if config.value_guided else None
        self.register_buffer("value_scale", torch.ones(()))  # returns are divided by this for V

    # ------------------------------------------------------------------ training
    @classmethod
    def from_dataset(cls, dataset, config: DiffuserConfig) -> "DiffuserPlanner":
        policy = cls(config, SpaceSpec.from_dataset(dataset))
        x = dataset.observations
        if config.with_actions:
            x = np.concatenate([x, dataset.actions], axis=1)
        rows = [x]
        if config.pad and dataset.goals is not None:  # padded rows [goal, 0, ...] are data too
            rows.append(policy._goal_states_np(dataset.goals))
        policy.normalizer.fit(np.concatenate(rows, 0))
        if config.value_guided:
            windows = policy._windows(dataset)
            v = windows.sample(min(len(windows), 50_000), np.random.default_rng(0))["value"]
            policy.value_scale.fill_(float(np.abs(v).max()) or 1.0)
        return policy

    def unguided(self) -> "DiffuserPlanner":
        """This planner without its value net: the same trajectory model (whose U-Net never sees the
        value net; the two train side by side) and normalizer, planning unguided. CTRL's pretrained
        base on reward tasks is this."""
        config = replace(self.config, value_guided=False, critic=None)
        policy = type(self)(config, self.spec).to(self.device)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("value.")}
        policy.load_state_dict(state)
        return policy

    def _goal_states_np(self, goals: np.ndarray) -> np.ndarray:
        """Rest states at the goal: [goal, 0, ...] rows of width self.dim."""
        return goal_rest_states(goals, self.dim)

    def _windows(self, dataset) -> SequenceWindows:
        keys = ("observations", "actions") if self.config.with_actions else ("observations",)
        pad_fn = rest_at_goal_pad if self.config.pad and dataset.goals is not None else None
        return SequenceWindows(dataset, self.config.horizon, keys=keys, pad=self.config.pad,
                               pad_obs_fn=pad_fn, value=self.config.value_guided,
                               discount=self.config.discount, stride=self.config.plan_stride,
                               termination_penalty=self.config.termination_penalty)

    def batches(self, dataset, batch_size: int, device: str | torch.device | None = None):
        """Batches ``{"x": [obs, act] windows, "value"}``. With ``device`` the windows live there
        and each batch is drawn and gathered there from torch's generator (``device_side``)."""
        windows = self._windows(dataset)
        with_actions = self.config.with_actions

        def assemble(b: dict, cat) -> dict:
            x = cat([b["observations"], b["actions"]], -1) if with_actions else b["observations"]
            return {"x": x, **({"value": b["value"]} if "value" in b else {})}

        if device is not None:
            on_device = windows.to(device)

            def sample_on_device(step: int, rng=None) -> dict:
                return assemble(on_device.sample(batch_size), torch.cat)

            sample_on_device.device_side = True
            return sample_on_device

        def sample_batch(step: int, rng: np.random.Generator) -> dict:
            return assemble(windows.sample(batch_size, rng), np.concatenate)

        return sample_batch

    def _conditions(self, x0n: torch.Tensor) -> Constraints:
        """Training-time inpainting: the window's own first (and, for goal tasks, last) state."""
        return window_constraints(x0n, self.obs_dim, bool(self.spec.goal_dim) and self.config.inpaint_goal)

    def loss(self, batch):
        x0 = self.normalizer.normalize(batch["x"])
        weight = None
        if self.config.with_actions and self.config.action_weight != 1.0:
            weight = torch.ones(self.plan_shape, device=x0.device)
            weight[0, self.obs_dim:] = self.config.action_weight
        loss = diffusion_loss(self.net, x0, self.schedule, objective=self.config.objective,
                              weight=weight, constraints=self._conditions(x0))
        logs = {"diffusion": loss.detach()}
        if self.value is not None:
            v_loss = self.value_loss(x0, batch["value"])
            logs["value"] = v_loss.detach()
            loss = loss + v_loss
        return loss, logs

    def value_loss(self, x0: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """V's regression loss: normalized windows ``x0`` (B, H, D) noised to a random level against
        their raw value targets ``value`` (B,) divided by ``value_scale``."""
        t = torch.rand(x0.shape[0], device=x0.device)
        xt = self.schedule.alpha(t)[:, None, None] * x0 + self.schedule.sigma(t)[:, None, None] * torch.randn_like(x0)
        return (self.value(xt, t) - value.reshape(-1) / self.value_scale).pow(2).mean()

    # ------------------------------------------------------------------ planning
    def constraints(self, obs: torch.Tensor, goal: torch.Tensor | None) -> Constraints:
        """Inpainting at plan time: normalized current state at step 0, [goal, 0, ...] at H-1."""
        goal = goal if self.config.inpaint_goal else None
        return plan_constraints(self.normalizer, obs, goal, self.config.horizon, self.obs_dim)

    @property
    def noise_samples(self) -> int:
        """Candidate plans per env (value guidance keeps the best): the runtime draws them all
        from the env's own noise generator."""
        ranked = self.value is not None or self.config.critic is not None or self.__dict__.get("_critic") is not None
        return self.config.n_samples if ranked and self.config.temperature > 0 else 1

    def capture_problem(self) -> str | None:
        """Why a plan cannot be captured in a CUDA graph (see ``diffplan.runtime.graphs``), or None."""
        if self.config.solver == "ddpm":
            return "solver 'ddpm' draws step noise from the per-env CPU generators inside the plan"
        return None

    def plan(self, obs, goal, noise, *, warm=None, t_start=1.0, steps=None, generator=None):
        """obs (B, obs_dim) raw, goal (B, goal_dim)|None, noise (B, H, D), or (B, n, H, D) with
        ``noise_samples = n`` candidates -> normalized plans (B, H, D). ``generator``: one per env
        (or one), for the stochastic solver steps (``solver: ddpm``)."""
        cfg = self.config
        steps = cfg.steps if steps is None else steps
        n = self.noise_samples
        if n > 1:  # n candidate plans per env, keep the best (by the critic, else by V)
            obs0 = obs
            obs, noise = obs.repeat_interleave(n, 0), candidate_noise(noise, n, generator)
            goal = None if goal is None else goal.repeat_interleave(n, 0)
            warm = None if warm is None else warm.repeat_interleave(n, 0)
        a, s = noise_level(self.schedule, t_start)  # cached floats
        s = s * cfg.temperature
        x_init = noise * s if warm is None else a * warm + s * noise
        denoise = make_denoiser(self.inference_net(), self.schedule, cfg.objective)
        guidance = None
        if self.value is not None:
            guidance = ValueGuidance(self.value, scale=cfg.guide_scale, n_guide_steps=cfg.n_guide_steps,
                                     t_stopgrad=cfg.t_stopgrad, variance_scaled=cfg.guide_variance)
        plans = sample(denoise, x_init, schedule=self.schedule, solver=cfg.solver, steps=steps,
                       t_start=t_start, constraints=self.constraints(obs, goal), guidance=guidance,
                       noise_prior=False, generator=generator)
        if n > 1:
            critic = self.reranker()
            if critic is not None:  # Q(s, first action) of every candidate, as it would be executed
                from diffplan.policies.critic import best_candidates

                return best_candidates(self, critic, plans, obs0, goal)
            pick = self.value(plans, torch.zeros(plans.shape[0], device=plans.device)).view(-1, n).argmax(1)
            plans = plans[pick + torch.arange(0, plans.shape[0], n, device=plans.device)]
        return plans

    def plan_states(self, plans: torch.Tensor) -> torch.Tensor:
        """Unnormalized states (B, H, obs_dim) of normalized plans, e.g. for plots."""
        return self.normalizer.unnormalize(plans)[..., : self.obs_dim]

    def action_at(self, plans, index, obs, goal):
        h = self.config.horizon
        if self.config.action_mode == "plan":
            i = index.clamp(max=h - 1)
            step = plans[torch.arange(plans.shape[0], device=plans.device), i]
            return self.normalizer.unnormalize(step)[:, self.obs_dim:]
        return pd_tracking(self.normalizer, plans, index, obs, self.obs_dim, self.spec.act_dim,
                           self.config.kp, self.config.kd, self.config.plan_stride, self.config.track_speed)

    @property
    def plan_stride(self) -> int:
        """Env steps between plan states (the runtime shifts warm starts by executed // stride)."""
        return self.config.plan_stride


# ---------------------------------------------------------------------------------------------
# Maze pieces shared with the other state-trajectory planners (e.g. TrajectoryDiffuser).

def goal_rest_states(goals: np.ndarray, dim: int) -> np.ndarray:
    """Rest states at the goal: ``[goal, 0, ...]`` rows (N, dim) for goals (N, goal_dim)."""
    out = np.zeros((len(goals), dim), np.float32)
    out[:, : goals.shape[1]] = goals
    return out


def rest_at_goal_pad(last_obs: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """``SequenceWindows`` padding past a segment's end: rest at ``[goal, 0, ...]``
    (teaches "arrive, then rest", which matches the end constraint of a plan)."""
    row = np.zeros_like(last_obs)
    row[..., : goal.shape[-1]] = goal
    return row


def window_constraints(x0n: torch.Tensor, obs_dim: int, goal_task: bool) -> Constraints:
    """Training-time inpainting of normalized windows (B, H, D): the window's own first state,
    and for goal tasks its last state."""
    dims = list(range(obs_dim))
    c = Constraints([0], dims, x0n[:, :1, :obs_dim])
    if goal_task:
        c = c + Constraints([x0n.shape[1] - 1], dims, x0n[:, -1:, :obs_dim])
    return c


def plan_constraints(normalizer, obs: torch.Tensor, goal: torch.Tensor | None, horizon: int,
                     obs_dim: int) -> Constraints:
    """Plan-time inpainting: normalized current state obs (B, obs_dim) at step 0 and, for goal
    tasks, the rest state ``[goal, 0, ...]`` (goal: (B, goal_dim)) at step H-1. ``normalizer``
    covers the plan's D >= obs_dim features; only the first obs_dim are constrained."""
    dims = list(range(obs_dim))
    start = torch.zeros(obs.shape[0], 1, normalizer.dim, device=obs.device, dtype=obs.dtype)
    start[:, 0, :obs_dim] = obs
    c = Constraints([0], dims, normalizer.normalize(start)[:, :, :obs_dim])
    if goal is not None:
        end = torch.zeros_like(start)
        end[:, 0, : goal.shape[1]] = goal
        c = c + Constraints([horizon - 1], dims, normalizer.normalize(end)[:, :, :obs_dim])
    return c


def check_tracking(stride: int, speed: float, action_mode: str) -> None:
    """A strided plan holds keypoints, not consecutive steps: only PD tracking can follow it."""
    if stride < 1:
        raise ValueError(f"plan_stride must be >= 1, got {stride}")
    if not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"track_speed must be a finite number > 0, got {speed}")
    if stride > 1 and action_mode != "pd":
        raise ValueError(f"plan_stride {stride} needs action_mode 'pd': a strided plan has no "
                         f"consecutive states or actions to read an action from")


def pd_tracking(normalizer, plans: torch.Tensor, index: torch.Tensor, obs: torch.Tensor,
                obs_dim: int, act_dim: int, kp: float = 1.0, kd: float = 1.0,
                stride: int = 1, speed: float = 1.0) -> torch.Tensor:
    """Diffuser's maze controller ``a = kp (wp_xy - xy) + kd (wp_vel - vel)`` toward the plan's
    state at env step ``index + 1`` of the normalized plans (B, H, D); past the plan's end, rest
    at its last state. A plan of stride ``s`` holds the states of steps 0, s, 2s, ...; between
    them the waypoint is interpolated linearly. ``speed`` > 1 runs through the plan faster than
    it was planned: the waypoint of env step i is the plan's state at step ``i * speed``, with its
    velocity scaled by ``speed``. The first act_dim state dims are positions and the next act_dim
    their velocities."""
    h = plans.shape[1]
    rows = torch.arange(plans.shape[0], device=plans.device)
    u = ((index + 1).to(plans.dtype) * (speed / stride)).clamp(max=h - 1)  # position in the plan
    lo = u.floor().long()
    wp = normalizer.unnormalize(plans[rows, lo])[:, :obs_dim]
    nxt = normalizer.unnormalize(plans[rows, (lo + 1).clamp(max=h - 1)])[:, :obs_dim]
    wp = torch.lerp(wp, nxt, (u - lo.to(u.dtype))[:, None])
    k = act_dim
    past_end = ((index + 1) * speed > (h - 1) * stride)[:, None]
    vel = torch.where(past_end, torch.zeros_like(wp[:, k: 2 * k]), speed * wp[:, k: 2 * k])
    return kp * (wp[:, :k] - obs[:, :k]) + kd * (vel - obs[:, k: 2 * k])


def candidate_noise(noise: torch.Tensor, n: int, generator=None) -> torch.Tensor:
    """Noise of n candidate plans per env, flattened to (B n, H, D). ``noise`` is (B, n, H, D)
    (the planner draws it from each env's generator) or (B, H, D): then it is the first
    candidate and the other n-1 come from ``generator`` (one per env, or one; None: torch's global one)."""
    if noise.dim() == 4:
        if noise.shape[1] != n:
            raise ValueError(f"noise has {noise.shape[1]} candidates per env, the config asks for n_samples={n}")
        return noise.flatten(0, 1)
    extra = randn((noise.shape[0], n - 1) + noise.shape[1:], generator, noise.device, noise.dtype)
    return torch.cat([noise[:, None], extra], 1).flatten(0, 1)
