"""Goal hold: a synthesized "arrive and hold" continuation of goal-reaching episodes.

Dataset synthesis, so it lives with the data; the action-chunk policies (anchored, Diffusion
Policy, BC) ask for it through ``policy.hold`` in their configs (docs/ARCHITECTURE.md, "Goal hold
for the action policies").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffplan.data.dataset import OfflineDataset


@dataclass(frozen=True)
class GoalHoldConfig:
    """The synthesized "arrive and hold" continuation of goal-reaching episodes.

    ``steps``: steps appended after every episode that ends on its goal (0: off). ``kp``, ``kd``,
    ``noise``: the hold controller ``a = clip(kp (goal - pos) - kd vel + noise N(0, 1))``; the
    defaults are the PD gains of the maze datasets' waypoint expert (``envs/maze_expert.py``), whose
    own action noise is 0.5. ``seed`` seeds the noise.
    """

    steps: int = 0
    kp: float = 10.0
    kd: float = 1.0
    noise: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"hold.steps must be >= 0, got {self.steps}")
        if self.kp <= 0 or self.kd < 0 or self.noise < 0:
            raise ValueError(f"hold needs kp > 0, kd >= 0, noise >= 0; got kp={self.kp}, kd={self.kd}, "
                             f"noise={self.noise}")


def fit_linear_dynamics(dataset) -> tuple[np.ndarray, float]:
    """Least-squares ``next_obs = [obs, action, 1] @ W`` over the dataset's transitions.

    Returns ``W`` (obs_dim + act_dim + 1, obs_dim) and the RMS residual. Uses ``next_observations``
    where the dataset has them, else the next step inside each episode."""
    obs, act = dataset.observations.astype(np.float64), dataset.actions.astype(np.float64)
    if dataset.next_observations is not None:
        nxt, keep = dataset.next_observations.astype(np.float64), np.ones(len(obs), bool)
    else:
        nxt = np.concatenate([obs[1:], obs[-1:]])
        keep = np.ones(len(obs), bool)
        keep[dataset.episode_ends - 1] = False
    x = np.concatenate([obs, act, np.ones((len(obs), 1))], 1)[keep]
    w, *_ = np.linalg.lstsq(x, nxt[keep], rcond=None)
    rms = float(np.sqrt(((x @ w - nxt[keep]) ** 2).mean()))
    return w, rms


def goal_hold_dataset(dataset, hold: GoalHoldConfig, action_low=None, action_high=None):
    """``dataset`` with a synthesized arrival-and-hold continuation after every goal-reaching episode.

    Why: goal-reaching datasets collected as one continuing run (the D4RL / Minari maze recipe)
    cut an episode on the step that reaches the goal, and the next episode has a new goal. No
    step ever shows the agent at its goal, so a goal-conditioned action policy learns to reach
    the goal but not to stop there, and in an eval env whose goal stays put it overshoots and
    oscillates. This appends ``hold.steps`` steps to every episode whose last reward is positive
    (it reached its goal): starting from that episode's final next-observation, a PD controller
    brakes onto the goal and holds it, ``a = clip(kp (goal - pos) - kd vel + noise N(0, 1))``, and
    the state follows a linear model ``next_obs = [obs, a, 1] @ W`` fitted to the dataset's own
    transitions (:func:`fit_linear_dynamics`), so the synthesized actions and states are those the
    data's dynamics give. The goal stays the episode's goal.

    Assumes a goal env whose observation starts with the achieved goal (``pos = obs[:goal_dim]``)
    followed by its velocity (``vel = obs[goal_dim:2 goal_dim]``), actuated per position axis
    (``act_dim == goal_dim``), as PointMaze's ``[x, y, vx, vy]`` with a 2-D force. Walls are not
    modelled (the PD hold stays within the goal radius of where it arrived). Actions are clipped to
    ``[action_low, action_high]`` (the policy's action space; default: the data's range).
    """
    if dataset.goals is None:
        raise ValueError("goal hold needs a goal dataset (dataset.goals is None)")
    g, obs_dim, act_dim = dataset.goals.shape[1], dataset.observations.shape[1], dataset.actions.shape[1]
    if obs_dim < 2 * g or act_dim != g:
        raise ValueError(f"goal hold needs observations [position ({g}), velocity ({g}), ...] and one action per "
                         f"position axis; got obs_dim={obs_dim}, act_dim={act_dim}, goal_dim={g}")
    if hold.steps == 0:
        return dataset
    starts, ends = dataset.episode_starts, dataset.episode_ends
    arrived = dataset.rewards[ends - 1] > 0
    last = ends[arrived] - 1
    n_hold = len(last)
    if n_hold == 0:
        raise ValueError("goal hold: no episode ends with a positive reward (on its goal)")
    w, _ = fit_linear_dynamics(dataset)
    if dataset.next_observations is not None:
        state = dataset.next_observations[last].astype(np.float64)
    else:
        state = dataset.observations[np.minimum(last + 1, len(dataset) - 1)].astype(np.float64)
    goal = dataset.goals[last].astype(np.float64)
    low = dataset.actions.min(0) if action_low is None else np.asarray(action_low)
    high = dataset.actions.max(0) if action_high is None else np.asarray(action_high)
    rng = np.random.default_rng(hold.seed)
    s_obs = np.empty((n_hold, hold.steps, obs_dim))
    s_act = np.empty((n_hold, hold.steps, act_dim))
    s_next = np.empty((n_hold, hold.steps, obs_dim))
    ones = np.ones((n_hold, 1))
    for t in range(hold.steps):
        a = hold.kp * (goal - state[:, :g]) - hold.kd * state[:, g:2 * g]
        if hold.noise > 0:
            a = a + hold.noise * rng.standard_normal(a.shape)
        a = np.minimum(np.maximum(a, low), high)
        s_obs[:, t], s_act[:, t] = state, a
        state = np.concatenate([state, a, ones], 1) @ w
        s_next[:, t] = state

    # Interleave: episode e's real steps, then (if it arrived) its hold steps.
    lengths = ends - starts
    new_len = lengths + np.where(arrived, hold.steps, 0)
    new_ends = np.cumsum(new_len)
    new_starts = new_ends - new_len
    total = int(new_ends[-1])
    real_pos = np.repeat(new_starts - starts, lengths) + np.arange(len(dataset))  # new index of each old step
    hold_pos = (new_starts[arrived] + lengths[arrived])[:, None] + np.arange(hold.steps)  # (n_hold, S)

    def merged(real, synth, dtype=np.float32):
        out = np.empty((total,) + real.shape[1:], dtype=dtype)
        out[real_pos] = real
        out[hold_pos.reshape(-1)] = synth.reshape((-1,) + real.shape[1:])
        return out

    timeouts = np.zeros(total, bool)
    timeouts[new_ends - 1] = True
    terminals = np.zeros(total, bool)
    terminals[real_pos] = dataset.terminals
    terminals[real_pos[ends[arrived] - 1]] = False  # the episode now goes on into its hold
    next_obs = dataset.next_observations
    return OfflineDataset(
        observations=merged(dataset.observations, s_obs),
        actions=merged(dataset.actions, s_act),
        rewards=merged(dataset.rewards, np.zeros((n_hold, hold.steps))),
        terminals=terminals, timeouts=timeouts,
        goals=merged(dataset.goals, np.repeat(goal[:, None], hold.steps, 1)),
        next_observations=None if next_obs is None else merged(next_obs, s_next),
        env_id=dataset.env_id, env_kwargs=dict(dataset.env_kwargs or {}),
        ref_min_score=dataset.ref_min_score, ref_max_score=dataset.ref_max_score,
        source=f"{dataset.source} + goal hold ({hold.steps} PD steps kp={hold.kp} kd={hold.kd} "
               f"noise={hold.noise} after each of {n_hold} goal-reaching episodes)",
        task=dataset.task)
