"""Diffusion Policy (Chi et al., RSS 2023): diffuse an action chunk conditioned on the observation.

What it trains
    A 1-D temporal U-Net denoises normalized action chunks of 16 steps. The observation (and the
    goal, for goal tasks) is a global condition that enters every residual block by FiLM, as in
    Chi et al.'s ConditionalUnet1D. The objective is epsilon prediction under the cosine
    ("squaredcos") schedule, the continuous-time form of their 100-step DDPM.

How it acts
    A chunk is sampled from full noise with DDIM in 10 steps (Chi et al. use 8 to 10 for speed),
    and the runtime executes the first 8 actions before replanning. As in Chi et al.
    (``clip_sample``), every step's x0 estimate is clipped to the action space (in normalized
    units): at t = 1 the cosine schedule has alpha = 4.5e-5, so ``x0 = (x - sigma eps) / alpha``
    turns a small epsilon error into an action of hundreds, which DDIM then carries along. One observation step only:
    the maze state already holds the velocity, so a history adds nothing there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffplan.data.goal_hold import GoalHoldConfig
from diffplan.policies.base import PolicyBase, SpaceSpec, register_policy
from diffplan.runtime.planner import PlannerConfig


@dataclass
class DiffusionPolicyConfig:
    horizon: int = 16  # actions per chunk
    dim: int = 32
    dim_mults: tuple[int, ...] = (1, 2, 4)
    schedule: str = "vp_cosine"
    objective: str = "eps"
    solver: str = "ddim"
    steps: int = 10
    clip_x0: bool = True  # clip each step's x0 estimate to the action space (Chi et al.'s clip_sample)
    hold: GoalHoldConfig = field(default_factory=GoalHoldConfig)  # synthesized arrival + hold at the goal
    runtime: PlannerConfig = field(default_factory=lambda: PlannerConfig(n_action_steps=8))

    def __post_init__(self):
        if self.runtime.n_action_steps > self.horizon:
            raise ValueError(f"runtime.n_action_steps {self.runtime.n_action_steps} > horizon {self.horizon}")
        if self.horizon % (2 ** (len(self.dim_mults) - 1)):
            raise ValueError(f"horizon {self.horizon} must be divisible by 2**(len(dim_mults)-1) for the U-Net")


@register_policy
class DiffusionPolicy(PolicyBase):
    kind = "diffusion_policy"
    Config = DiffusionPolicyConfig

    def __init__(self, config: DiffusionPolicyConfig, spec: SpaceSpec):
        super().__init__(config, spec)
        from diffplan.diffusion import Schedule
        from diffplan.nn import TemporalUNet

        self.plan_shape = (config.horizon, spec.act_dim)
        self.schedule = getattr(Schedule, config.schedule)()
        self.add_obs_action_normalizers()
        self.net = TemporalUNet(spec.act_dim, dim=config.dim, dim_mults=config.dim_mults,
                                cond_dim=spec.obs_dim + spec.goal_dim, film=True)

    # ------------------------------------------------------------------ training
    @classmethod
    def from_dataset(cls, dataset, config: DiffusionPolicyConfig) -> "DiffusionPolicy":
        policy = cls(config, SpaceSpec.from_dataset(dataset))
        policy.fit_obs_action_normalizers(dataset)
        return policy

    def batches(self, dataset, batch_size: int):
        """Chunks of ``horizon`` actions inside one episode (with its goal hold), with the observation before them."""
        return self.action_chunk_batches(dataset, self.config.horizon, batch_size, hold=self.config.hold)

    def condition(self, obs: torch.Tensor, goal: torch.Tensor | None) -> torch.Tensor:
        """Raw obs (B, obs_dim), goal (B, goal_dim)|None -> FiLM condition (B, obs_dim + goal_dim)."""
        c = self.obs_features(obs, goal)
        return c

    def loss(self, batch):
        from diffplan.diffusion import diffusion_loss

        x0 = self.action_normalizer.normalize(batch["actions"])
        cond = self.condition(batch["obs"], batch.get("goal"))
        loss = diffusion_loss(self.net, x0, self.schedule, objective=self.config.objective, cond=cond)
        return loss, {"diffusion": loss.detach()}

    # ------------------------------------------------------------------ acting
    def plan(self, obs, goal, noise, *, warm=None, t_start=1.0, steps=None, generator=None):
        """obs (B, obs_dim), goal (B, goal_dim)|None, noise (B, H, act_dim) -> actions (B, H, act_dim)."""
        from diffplan.diffusion import make_denoiser, sample

        steps = self.config.steps if steps is None else steps
        a, s = self.schedule.alpha(torch.tensor(t_start)), self.schedule.sigma(torch.tensor(t_start))
        x_init = noise * s if warm is None else a * self.action_normalizer.normalize(warm) + s * noise
        denoise = make_denoiser(self.inference_net(), self.schedule, self.config.objective, cond=self.condition(obs, goal))
        if self.config.clip_x0:
            lo = self.action_normalizer.normalize(self._action_low)
            hi = self.action_normalizer.normalize(self._action_high)
            unclipped = denoise
            denoise = lambda x, t: torch.maximum(torch.minimum(unclipped(x, t), hi), lo)  # noqa: E731
        x0 = sample(denoise, x_init, schedule=self.schedule, solver=self.config.solver, steps=steps,
                    t_start=t_start, noise_prior=False, generator=generator)
        return self.action_normalizer.unnormalize(x0)

    def action_at(self, plans, index, obs, goal):
        i = index.clamp(max=plans.shape[1] - 1)
        return plans[torch.arange(plans.shape[0], device=plans.device), i]
