"""Behaviour cloning: an MLP from the observation (and goal) to the action, trained by MSE.

The baseline every generative policy must beat. Regressing the mean action is exactly what fails
when the data has several modes for one observation: the average of "go left" and "go right" is
"go straight". Plans are single actions, ``plan_shape = (1, act_dim)``, so the runtime asks for a
new one every step; one network evaluation per decision.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from diffplan.data.goal_hold import GoalHoldConfig
from diffplan.policies.base import PolicyBase, SpaceSpec, register_policy
from diffplan.runtime.planner import PlannerConfig


@dataclass
class BCConfig:
    hidden: tuple[int, ...] = (256, 256)
    hold: GoalHoldConfig = field(default_factory=GoalHoldConfig)  # synthesized arrival + hold at the goal
    runtime: PlannerConfig = field(default_factory=lambda: PlannerConfig(n_action_steps=1))

    def __post_init__(self):
        if self.runtime.n_action_steps != 1:
            raise ValueError("BC plans one action at a time: runtime.n_action_steps must be 1")


@register_policy
class BCPolicy(PolicyBase):
    kind = "bc"
    Config = BCConfig

    def __init__(self, config: BCConfig, spec: SpaceSpec):
        super().__init__(config, spec)

        self.plan_shape = (1, spec.act_dim)
        self.add_obs_action_normalizers()
        dims = (spec.obs_dim + spec.goal_dim, *config.hidden)
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.Mish()]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], spec.act_dim))

    @classmethod
    def from_dataset(cls, dataset, config: BCConfig) -> "BCPolicy":
        policy = cls(config, SpaceSpec.from_dataset(dataset))
        policy.fit_obs_action_normalizers(dataset)
        return policy

    def batches(self, dataset, batch_size: int):
        """Single steps (observation, goal, action), from the same windows as the chunk policies
        (chunks of 1, with the goal hold if configured)."""
        chunks = self.action_chunk_batches(dataset, 1, batch_size, hold=self.config.hold)

        def sample_batch(step: int, rng: np.random.Generator) -> dict:
            out = chunks(step, rng)
            out["actions"] = out["actions"][:, 0]
            return out

        return sample_batch

    def forward(self, obs: torch.Tensor, goal: torch.Tensor | None) -> torch.Tensor:
        """Raw obs (B, obs_dim), goal (B, goal_dim)|None -> normalized action (B, act_dim)."""
        x = self.obs_features(obs, goal)
        return self.net(x)

    def loss(self, batch):
        target = self.action_normalizer.normalize(batch["actions"])
        mse = (self(batch["obs"], batch.get("goal")) - target).pow(2).mean()
        return mse, {"mse": mse.detach()}

    def plan(self, obs, goal, noise, *, warm=None, t_start=1.0, steps=None, generator=None):
        """-> unnormalized actions (B, 1, act_dim); the noise is not used."""
        return self.action_normalizer.unnormalize(self(obs, goal))[:, None]

    def action_at(self, plans, index, obs, goal):
        return plans[:, 0]
