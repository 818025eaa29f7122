"""What every diffplan policy shares: spaces, observation checks, ``act`` through the runtime,
checkpoints, and ``load_policy``.

A policy is an ``nn.Module`` that owns its networks and normalizers. For training it exposes
``loss(batch)`` and ``batches(dataset)`` to the generic :class:`~diffplan.train.Trainer`; for
control it exposes ``plan`` and ``action_at`` to the generic :class:`~diffplan.runtime.Planner`,
which every ``act`` goes through.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from diffplan.config import ConfigError, from_dict, to_dict
from diffplan.runtime.planner import Planner, PlannerConfig

POLICIES: dict[str, type["PolicyBase"]] = {}


def register_policy(cls):
    """Class decorator: make ``cls`` loadable by ``load_policy`` under ``cls.kind``."""
    POLICIES[cls.kind] = cls
    return cls


class ObservationError(ValueError):
    """An observation given to ``act`` has the wrong keys, shape or values."""


@dataclass
class SpaceSpec:
    """The environment a policy was trained for; saved in every checkpoint."""

    obs_dim: int
    act_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    goal_dim: int = 0  # > 0 for goal envs, whose observations are dicts
    task: str | None = None
    env_id: str | None = None
    env_kwargs: dict = field(default_factory=dict)  # gym.make kwargs of env_id (data without a task)

    @classmethod
    def from_dataset(cls, dataset) -> "SpaceSpec":
        """Dims from the arrays; action bounds from the task's (or env id's) action space."""
        space = None
        if dataset.task:
            from diffplan.envs import get_task

            env = get_task(dataset.task).make_env()
            space = env.action_space
            env.close()
        elif dataset.env_id:
            try:
                env = gym.make(dataset.env_id, **(dataset.env_kwargs or {}))
                space = env.action_space
                env.close()
            except Exception:  # unknown env here: fall back to the data's range
                space = None
        if space is not None:
            low, high = space.low, space.high
        else:
            low, high = dataset.actions.min(0), dataset.actions.max(0)
        goal_dim = 0 if dataset.goals is None else int(dataset.goals.shape[1])
        return cls(obs_dim=int(dataset.observations.shape[1]), act_dim=int(dataset.actions.shape[1]),
                   action_low=tuple(float(v) for v in low), action_high=tuple(float(v) for v in high),
                   goal_dim=goal_dim, task=dataset.task, env_id=dataset.env_id,
                   env_kwargs=dict(dataset.env_kwargs or {}))


# ---------------------------------------------------------------------------------------------- goal hold
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


def goal_hold_dataset(dataset, hold: GoalHoldConfig):
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
    modelled (the PD hold stays within the goal radius of where it arrived).
    """
    from diffplan.data import OfflineDataset

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
    spec = SpaceSpec.from_dataset(dataset)  # the action space of the task or env, else the data's range
    low, high = np.asarray(spec.action_low), np.asarray(spec.action_high)
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


class PolicyBase(nn.Module):
    """Base class of every policy. Subclasses set ``kind`` and ``Config`` and implement
    ``loss``, ``batches``, ``plan``, ``action_at`` and (for training) ``from_dataset``."""

    kind: ClassVar[str] = ""
    Config: ClassVar[type] = object
    plan_shape: tuple[int, int]
    steps_field: ClassVar[str] = "steps"  # the config field holding a cold plan's solver steps

    @property
    def default_steps(self) -> int:
        """Solver steps of a cold plan, read from the config on every plan, so that editing
        ``policy.config.<steps_field>`` after loading takes effect (1 for configs without one)."""
        return int(getattr(self.config, self.steps_field, 1))

    def __init__(self, config, spec: SpaceSpec):
        super().__init__()
        self.config = config
        self.spec = spec
        runtime = getattr(config, "runtime", None) or PlannerConfig()
        self.planner = Planner(self, runtime)
        self.register_buffer("_action_low", torch.tensor(spec.action_low, dtype=torch.float32), persistent=False)
        self.register_buffer("_action_high", torch.tensor(spec.action_high, dtype=torch.float32), persistent=False)

    # ------------------------------------------------------------------ spaces
    @property
    def action_space(self) -> gym.spaces.Box:
        return gym.spaces.Box(np.asarray(self.spec.action_low, np.float32),
                              np.asarray(self.spec.action_high, np.float32), dtype=np.float32)

    @property
    def observation_space(self) -> gym.Space:
        box = gym.spaces.Box(-np.inf, np.inf, (self.spec.obs_dim,), np.float32)
        if not self.spec.goal_dim:
            return box
        goal = gym.spaces.Box(-np.inf, np.inf, (self.spec.goal_dim,), np.float32)
        return gym.spaces.Dict(observation=box, achieved_goal=goal, desired_goal=goal)

    @property
    def device(self) -> torch.device:
        return self._action_low.device

    # ------------------------------------------------------------------ acting
    def reset(self, mask=None, seed=None) -> None:
        """Start new episode(s): all envs, or those where ``mask`` (B,) is true.

        ``seed`` (an int, or one per env) makes the plans' noise reproducible."""
        self.planner.reset(mask, seed=seed)

    @torch.inference_mode()
    def act(self, obs, budget_ms: float | None = None) -> np.ndarray:
        """Observation(s) as the Gymnasium env gives them -> action(s) inside ``action_space``.

        One observation gives ``(act_dim,)``; a batch (from a vector env) gives ``(B, act_dim)``.
        """
        obs_t, goal_t, batched = self.prepare_obs(obs)
        dtype = self.planner.config.dtype
        with torch.autocast(self.device.type, dtype=getattr(torch, dtype or "bfloat16"), enabled=dtype is not None):
            action = self.planner.act(obs_t, goal_t, budget_ms=budget_ms)
        out = self.action_to_env(action.float()).cpu().numpy()
        return out if batched else out[0]

    def prepare_obs(self, obs) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Check and convert an env observation to tensors ``(B, obs_dim)``, ``(B, goal_dim)|None``."""
        spec = self.spec
        goal = None
        if spec.goal_dim:
            if not isinstance(obs, dict) or "observation" not in obs or "desired_goal" not in obs:
                got = sorted(obs) if isinstance(obs, dict) else type(obs).__name__
                raise ObservationError(
                    f"{type(self).__name__} for {spec.task or spec.env_id} expects a dict observation with "
                    f"keys 'observation' and 'desired_goal', got {got}")
            goal = self._as_array(obs["desired_goal"], spec.goal_dim, "desired_goal")
            obs = obs["observation"]
        elif isinstance(obs, dict):
            raise ObservationError(f"{type(self).__name__} expects an array observation of shape "
                                   f"({spec.obs_dim},), got a dict with keys {sorted(obs)}")
        x = self._as_array(obs, spec.obs_dim, "observation")
        batched = x.ndim == 2
        if goal is not None and goal.shape[:-1] != x.shape[:-1]:
            raise ObservationError(f"observation batch {x.shape} and desired_goal batch {goal.shape} differ")
        x = torch.as_tensor(np.atleast_2d(x), dtype=torch.float32, device=self.device)
        if goal is not None:
            goal = torch.as_tensor(np.atleast_2d(goal), dtype=torch.float32, device=self.device)
        return x, goal, batched

    @staticmethod
    def _as_array(value, dim: int, name: str) -> np.ndarray:
        arr = np.asarray(value, dtype=np.float32)
        if arr.ndim not in (1, 2) or arr.shape[-1] != dim:
            raise ObservationError(f"{name} has shape {arr.shape}, expected ({dim},) or (batch, {dim})")
        if not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr))[0].tolist()
            raise ObservationError(f"{name} contains NaN or inf (first at index {bad})")
        return arr

    def inference_net(self) -> nn.Module:
        """``self.net`` for planning: compiled once with ``torch.compile`` when the runtime config
        asks for it (the saved weights and ``state_dict`` names are untouched)."""
        if not self.planner.config.compile:
            return self.net
        compiled = self.__dict__.get("_compiled_net")
        if compiled is None or compiled[0] is not self.net:
            compiled = (self.net, torch.compile(self.net, dynamic=False))
            self.__dict__["_compiled_net"] = compiled  # kept out of nn.Module's registries
        return compiled[1]

    def action_to_env(self, action: torch.Tensor) -> torch.Tensor:
        """Clip actions (B, act_dim) into the action space."""
        return torch.maximum(torch.minimum(action, self._action_high), self._action_low)

    # ------------------------------------------------------------------ observation -> action policies
    def add_obs_action_normalizers(self) -> None:
        """Gaussian normalizers for observations, goals (goal envs only) and actions: the inputs and
        outputs of the policies that map an observation to an action chunk (BC, Diffusion Policy,
        anchored). Saved in the checkpoint as ``obs_normalizer.*``, ``goal_normalizer.*``,
        ``action_normalizer.*``."""
        from diffplan.data import GaussianNormalizer

        spec = self.spec
        self.obs_normalizer = GaussianNormalizer(spec.obs_dim)
        self.goal_normalizer = GaussianNormalizer(spec.goal_dim) if spec.goal_dim else None
        self.action_normalizer = GaussianNormalizer(spec.act_dim)

    def fit_obs_action_normalizers(self, dataset) -> None:
        self.obs_normalizer.fit(dataset.observations)
        if self.goal_normalizer is not None:
            self.goal_normalizer.fit(dataset.goals)
        self.action_normalizer.fit(dataset.actions)

    def action_chunk_windows(self, dataset, chunk: int, pad: bool = False, hold: GoalHoldConfig | None = None,
                             discount: float | None = None):
        """`SequenceWindows` of ``chunk`` consecutive actions inside one episode with the observation
        before them, over the dataset extended by ``hold`` (see :func:`goal_hold_dataset`); with
        ``discount``, also the discounted returns-to-go."""
        from diffplan.data import SequenceWindows

        data = self.held_dataset(dataset, hold)
        return SequenceWindows(data, chunk, keys=("observations", "actions"), pad=pad,
                               goal=bool(self.spec.goal_dim) and data.goals is not None,
                               returns_to_go=discount is not None, discount=discount or 0.99)

    def held_dataset(self, dataset, hold: GoalHoldConfig | None):
        """``dataset`` with its goal-hold continuations (cached: anchors and batches share it)."""
        if hold is None or hold.steps == 0:
            return dataset
        cached = self.__dict__.get("_held_dataset")
        if cached is not None and cached[0] is dataset and cached[1] == hold:
            return cached[2]
        held = goal_hold_dataset(dataset, hold)
        self.__dict__["_held_dataset"] = (dataset, hold, held)  # kept out of nn.Module's registries
        return held

    def action_chunk_batches(self, dataset, chunk: int, batch_size: int, pad: bool = False,
                             hold: GoalHoldConfig | None = None, discount: float | None = None):
        """Trainer batches of ``chunk`` consecutive actions inside one episode with the observation
        (and goal) at the chunk's first step: ``{"obs", "actions", ["goal"]}``. With ``hold``, the
        episodes that end on their goal continue with a synthesized arrival and hold at the goal
        (:func:`goal_hold_dataset`), so "at the goal: brake and stay" is in the data. With
        ``discount``, ``"rtg"`` (B,) is the discounted return-to-go at the chunk's first step."""
        windows = self.action_chunk_windows(dataset, chunk, pad=pad, hold=hold, discount=discount)

        def sample_batch(step: int, rng: np.random.Generator) -> dict:
            w = windows.sample(batch_size, rng)
            out = {"obs": w["observations"][:, 0], "actions": w["actions"]}
            if "goal" in w:
                out["goal"] = w["goal"]
            if "returns_to_go" in w:
                out["rtg"] = w["returns_to_go"][:, 0, 0]
            return out

        return sample_batch

    def obs_features(self, obs: torch.Tensor, goal: torch.Tensor | None) -> torch.Tensor:
        """Normalized ``[obs, goal]`` (B, obs_dim + goal_dim), the usual conditioning vector."""
        x = self.obs_normalizer.normalize(obs)
        if self.goal_normalizer is not None:
            x = torch.cat([x, self.goal_normalizer.normalize(goal)], -1)
        return x

    # ------------------------------------------------------------------ training hooks
    @classmethod
    def from_dataset(cls, dataset, config) -> "PolicyBase":
        raise NotImplementedError

    def batches(self, dataset, batch_size: int) -> Callable[[int, np.random.Generator], dict]:
        """A batch sampler for the trainer: ``(step, rng) -> dict of arrays`` with a leading batch axis."""
        raise NotImplementedError

    def loss(self, batch: dict[str, torch.Tensor]):
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoints
    def run_config(self, **extra) -> dict[str, Any]:
        """Everything ``load_policy`` needs to rebuild this policy, as YAML-safe data."""
        cfg = {"kind": self.kind, "spec": to_dict(self.spec), "policy": to_dict(self.config)}
        cfg.update(extra)
        return cfg

    @classmethod
    def from_config(cls, cfg: dict) -> "PolicyBase":
        spec = from_dict(SpaceSpec, cfg.get("spec"), "spec")
        config = from_dict(cls.Config, cfg.get("policy"), "policy")
        return cls(config, spec)

    def save(self, path, **extra) -> Path:
        """Write an inference checkpoint folder (``model.safetensors`` + ``config.yaml``)."""
        from diffplan.train.checkpoint import save_checkpoint

        state = {k: v for k, v in self.state_dict().items()}
        save_checkpoint(path, state, self.run_config(**extra))
        return Path(path)


def load_policy(path, device: str | torch.device = "cpu", task: str | None = None) -> PolicyBase:
    """Rebuild any policy from a checkpoint folder (or a training run folder: its latest checkpoint;
    a shipped ``checkpoints/...`` path works from any folder).

    ``task``: if given, refuse a checkpoint trained for another task, naming both.
    """
    from diffplan.resources import find
    from diffplan.train.checkpoint import load_checkpoint
    import diffplan.policies  # noqa: F401  (registers every policy kind)

    ckpt = load_checkpoint(find(path))
    cfg = ckpt.config
    kind = cfg.get("kind")
    if kind not in POLICIES:
        raise ConfigError(f"{ckpt.path}: unknown policy kind {kind!r}; known kinds: {', '.join(sorted(POLICIES))}")
    policy = POLICIES[kind].from_config(cfg)
    trained_for = policy.spec.task
    if task is not None and trained_for is not None and task != trained_for:
        raise ConfigError(f"checkpoint {ckpt.path} was trained for task {trained_for!r}, not {task!r}")
    missing, unexpected = policy.load_state_dict(ckpt.model_state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{ckpt.path}/model.safetensors does not match a {kind} policy built from its "
                          f"config.yaml: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    policy.checkpoint_path = Path(ckpt.path)
    return policy.to(device).eval()
