"""An in-sample critic: IQL's Q and V (Kostrikov, Nair & Levine, ICLR 2022), shared by the samplers
that rerank candidates (``critic:`` in a policy's config).

What it trains
    Twin Q(s, a) MLPs and a V(s) MLP (256-256, ReLU) on normalized observations and actions:
        L_V = E[ |tau - 1(u < 0)| u^2 ],  u = min(Q_targ1, Q_targ2)(s, a) - V(s)   (expectile, tau 0.7)
        L_Q = E[ (Q_i(s, a) - (r + gamma (1 - terminal) V(s')))^2 ],  i = 1, 2
    with (s, a, r, s') the dataset's own transitions only: no action outside the data is ever
    evaluated, so nothing is extrapolated. The target Qs follow by Polyak averaging (0.005) at every
    loss call. Rewards are scaled by ``reward_scale`` (None: IQL's locomotion scaling,
    1000 / (max - min episode return)); ranking only needs the order of Q, not its units.

How it is used
    It is a checkpoint like any policy (``kind: critic``; ``load_policy`` rebuilds it) but it does
    not act. :func:`rerank` picks, per env, the candidate first action of highest min-Q.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from diffplan.config import ConfigError
from diffplan.policies.base import PolicyBase, SpaceSpec, register_policy


@dataclass
class CriticConfig:
    hidden: tuple[int, ...] = (256, 256)
    discount: float = 0.99
    expectile: float = 0.7
    polyak: float = 0.005  # target Q <- (1 - polyak) target Q + polyak Q, once per loss call
    reward_scale: float | None = None  # None: 1000 / (max - min episode return), as IQL on locomotion

    def __post_init__(self):
        if not 0.0 < self.discount <= 1.0 or not 0.0 < self.expectile < 1.0 or not 0.0 < self.polyak <= 1.0:
            raise ValueError("critic needs discount in (0, 1], expectile in (0, 1), polyak in (0, 1]")


def _mlp(inp: int, hidden: tuple[int, ...], out: int) -> nn.Sequential:
    dims, layers = (inp, *hidden), []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(dims[-1], out))


class TwinQ(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.q1, self.q2 = _mlp(obs_dim + act_dim, hidden, 1), _mlp(obs_dim + act_dim, hidden, 1)

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([s, a], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


@register_policy
class Critic(PolicyBase):
    kind = "critic"
    Config = CriticConfig

    def __init__(self, config: CriticConfig, spec: SpaceSpec):
        super().__init__(config, spec)
        self.plan_shape = (1, spec.act_dim)
        self.add_obs_action_normalizers()
        self.register_buffer("reward_scale", torch.tensor(float(config.reward_scale or 1.0)))
        self.q = TwinQ(spec.obs_dim, spec.act_dim, tuple(config.hidden))
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        self.v = _mlp(spec.obs_dim, tuple(config.hidden), 1)

    @classmethod
    def from_dataset(cls, dataset, config: CriticConfig) -> "Critic":
        if dataset.next_observations is None:
            raise ConfigError("critic: the dataset has no next_observations (needed for the TD target)")
        if dataset.goals is not None:
            raise ConfigError("critic: goal-conditioned datasets are not supported (Q(s, a) has no goal input)")
        critic = cls(config, SpaceSpec.from_dataset(dataset))
        critic.fit_obs_action_normalizers(dataset)
        if config.reward_scale is None:
            returns = dataset.episode_returns()
            spread = float(returns.max() - returns.min())
            critic.reward_scale.fill_(1000.0 / spread if spread > 0 else 1.0)
        return critic

    def batches(self, dataset, batch_size: int):
        """Uniform transitions ``{"obs", "actions", "rewards", "next_obs", "terminals"}``."""
        if dataset.next_observations is None:
            raise ConfigError("critic: the dataset has no next_observations (needed for the TD target)")
        arrays = {"obs": dataset.observations, "actions": dataset.actions, "rewards": dataset.rewards,
                  "next_obs": dataset.next_observations, "terminals": dataset.terminals.astype(np.float32)}

        def sample_batch(step: int, rng: np.random.Generator) -> dict:
            i = rng.integers(0, len(dataset), batch_size)
            return {k: v[i] for k, v in arrays.items()}

        return sample_batch

    @torch.no_grad()
    def update_target(self) -> None:
        for t, p in zip(self.q_target.parameters(), self.q.parameters()):
            t.lerp_(p, self.config.polyak)

    def loss(self, batch):
        self.update_target()
        s = self.obs_normalizer.normalize(batch["obs"])
        a = self.action_normalizer.normalize(batch["actions"])
        with torch.no_grad():
            q_targ = torch.minimum(*self.q_target(s, a))
            next_v = self.v(self.obs_normalizer.normalize(batch["next_obs"])).squeeze(-1)
            td = batch["rewards"] * self.reward_scale + self.config.discount * (1 - batch["terminals"]) * next_v
        u = q_targ - self.v(s).squeeze(-1)
        v_loss = (torch.abs(self.config.expectile - (u < 0).float()) * u.pow(2)).mean()
        q1, q2 = self.q(s, a)
        q_loss = (q1 - td).pow(2).mean() + (q2 - td).pow(2).mean()
        return v_loss + q_loss, {"v_loss": v_loss.detach(), "q_loss": q_loss.detach(), "q": q1.mean().detach()}

    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Raw obs (..., obs_dim), raw actions (..., act_dim) -> min of the twin Qs (...), in float32
        even under a policy's bf16 autocast (candidates' Qs differ by ~1% of their value)."""
        with torch.autocast(obs.device.type, enabled=False):
            s = self.obs_normalizer.normalize(obs.float())
            a = self.action_normalizer.normalize(actions.float())
            return torch.minimum(*self.q(s, a))

    def plan(self, obs, goal, noise, **kwargs):
        raise ConfigError("a critic does not act: give it as a policy's 'critic:' to rerank candidates")

    def action_at(self, plans, index, obs, goal):
        raise ConfigError("a critic does not act: give it as a policy's 'critic:' to rerank candidates")


def rerank(critic, obs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """obs (B, obs_dim), candidate first actions (B, K, act_dim), raw -> index (B,) of the highest Q.

    One batched call ``critic.q_value`` over all B x K pairs."""
    b, k, _ = candidates.shape
    q = critic.q_value(obs[:, None].expand(b, k, obs.shape[-1]), candidates)
    return q.reshape(b, k).argmax(-1)


def best_candidates(policy, critic, plans: torch.Tensor, obs: torch.Tensor, goal: torch.Tensor | None) -> torch.Tensor:
    """Of ``n`` candidate plans per env (``plans`` (B n, H, D), each env's n in a row; ``goal`` repeated
    the same way or None), the one whose first action, as ``policy`` would execute it (clipped, through
    ``action_at``), has the highest Q of ``critic`` at ``obs`` (B, obs_dim) -> (B, H, D)."""
    b = obs.shape[0]
    n = plans.shape[0] // b
    zero = torch.zeros(plans.shape[0], dtype=torch.long, device=plans.device)
    firsts = policy.action_to_env(policy.action_at(plans, zero, obs.repeat_interleave(n, 0), goal))
    pick = rerank(critic, obs, firsts.view(b, n, -1))
    return plans[pick + torch.arange(0, plans.shape[0], n, device=plans.device)]


def load_critic(path, device, spec: SpaceSpec | None = None) -> Critic:
    """A ``kind: critic`` checkpoint, on ``device``; one clear line if the path holds another kind
    or (given the policy's ``spec``) other observation / action sizes."""
    from diffplan.policies.base import load_policy

    critic = load_policy(path, device=device)
    if not isinstance(critic, Critic):
        raise ConfigError(f"critic: {path} holds a {critic.kind!r} checkpoint, not a critic")
    dims = (critic.spec.obs_dim, critic.spec.act_dim)
    if spec is not None and dims != (spec.obs_dim, spec.act_dim):
        raise ConfigError(f"critic: {path} is for obs_dim, act_dim = {dims}, the policy has "
                          f"{(spec.obs_dim, spec.act_dim)}")
    # Q is in-sample: it knows only the actions of the data it was fitted on, so it must come from
    # the policy's own task (the v0 critic on halfcheetah-medium-v1's anchored policy: 20.4 against
    # 41.6 without one; docs/ARCHITECTURE.md).
    theirs, ours = critic.spec.task, spec.task if spec is not None else None
    if theirs and ours and theirs != ours:
        raise ConfigError(f"critic: {path} was trained on {theirs}, the policy on {ours}; train one on "
                          f"{ours} (a kind: critic config with task={ours}) and give it as policy.critic, "
                          "or set policy.critic=null")
    return critic
