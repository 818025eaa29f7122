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

from diffplan.config import ConfigError, from_dict, resolve_device, to_dict
from diffplan.data.goal_hold import GoalHoldConfig, goal_hold_dataset
from diffplan.data.normalizers import Normalizer
from diffplan.runtime.planner import Planner, PlannerConfig

POLICIES: dict[str, type["PolicyBase"]] = {}


def register_policy(cls):
    """Class decorator: make ``cls`` loadable by ``load_policy`` under ``cls.kind``."""
    POLICIES[cls.kind] = cls
    return cls


class ObservationError(ValueError):
    """An observation given to ``act`` has the wrong keys, shape or values."""


class ActionError(FloatingPointError):
    """``act`` computed NaN actions (the weights or normalizer statistics in memory are not finite)."""


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


class PolicyBase(nn.Module):
    """Base class of every policy. Subclasses set ``kind`` and ``Config`` and implement
    ``loss``, ``batches``, ``plan``, ``action_at`` and (for training) ``from_dataset``."""

    kind: ClassVar[str] = ""
    Config: ClassVar[type] = object
    plan_shape: tuple[int, int]
    steps_field: ClassVar[str] = "steps"  # the config field holding a cold plan's solver steps
    min_steps: ClassVar[int] = 1  # the fewest it plans with (0: a plan without a denoising step)

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
        if np.isnan(out).any():
            raise ActionError(f"{type(self).__name__}.act computed NaN actions for env(s) "
                              f"{np.flatnonzero(np.isnan(out).any(-1)).tolist()[:8]}: "
                              f"{self.state_problem() or 'no weight or statistic is NaN or inf; the plan overflowed'}")
        return out if batched else out[0]

    def state_problem(self) -> str | None:
        """What in the state dict cannot act (NaN or inf weights, a normalizer's zero scale), or None."""
        for name, value in self.state_dict().items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                return f"{name} holds NaN or inf values"
        for name, module in self.named_modules():
            if isinstance(module, Normalizer):
                try:
                    module.check()
                except ValueError as e:
                    return f"{name}: {e}"
        return None

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
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":  # complex would lose its imaginary part, objects turn into NaN
            raise ObservationError(f"{name} has dtype {arr.dtype}; expected real numbers (float or int)")
        arr = arr.astype(np.float32, copy=False)
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
        """Clip actions (B, ..., act_dim) into the action space."""
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
        held = goal_hold_dataset(dataset, hold, self.spec.action_low, self.spec.action_high)
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

    # ------------------------------------------------------------------ reranking by a critic
    def use_critic(self, critic) -> None:
        """Rerank candidates by ``critic`` (anything with ``q_value(obs, actions)``), or None: by
        ``config.critic`` if set, else as the policy picks without one. Kept out of the state dict."""
        self.__dict__["_critic"] = critic

    def reranker(self):
        """The critic that reranks this policy's candidates, or None (loaded once from the
        config's ``critic``, a ``kind: critic`` checkpoint, for the policies that have that field)."""
        critic = self.__dict__.get("_critic")
        path = getattr(self.config, "critic", None)
        if critic is None and path is not None:
            from diffplan.policies.critic import load_critic

            from diffplan.resources import find

            # A repository-relative path (checkpoints/<task>/critic) is found beside this
            # checkpoint's own folder, whatever the working folder.
            near = getattr(self, "checkpoint_path", None)
            critic = load_critic(find(path, near=near / "config.yaml" if near else None), self.device, self.spec)
            self.__dict__["_critic"] = critic
        return critic

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


CHECKPOINT_KEYS = ("kind", "spec", "policy", "train", "data")  # the top level of a checkpoint's config.yaml


def load_policy(path, device: str | torch.device = "cpu", task: str | None = None) -> PolicyBase:
    """Rebuild any policy from a checkpoint folder (or a training run folder: its latest checkpoint;
    a shipped ``checkpoints/...`` path works from any folder).

    ``task``: if given, refuse a checkpoint trained for another task, naming both.
    """
    from diffplan.resources import find
    from diffplan.train.checkpoint import CheckpointError, check_shapes, load_checkpoint
    import diffplan.policies  # noqa: F401  (registers every policy kind)

    device = resolve_device(device)
    ckpt = load_checkpoint(find(path), resume_state=False)
    cfg = ckpt.config
    unknown = sorted(set(cfg) - set(CHECKPOINT_KEYS))
    if unknown:
        raise ConfigError(f"{ckpt.path}/config.yaml: unknown top-level key(s) {', '.join(map(repr, unknown))}; "
                          f"valid keys: {', '.join(CHECKPOINT_KEYS)}")
    kind = cfg.get("kind")
    if kind not in POLICIES:
        raise ConfigError(f"{ckpt.path}: unknown policy kind {kind!r}; known kinds: {', '.join(sorted(POLICIES))}")
    policy = POLICIES[kind].from_config(cfg)
    trained_for = policy.spec.task
    if task is not None and trained_for is not None and task != trained_for:
        raise ConfigError(f"checkpoint {ckpt.path} was trained for task {trained_for!r}, not {task!r}")
    where = f"{ckpt.path}/model.safetensors"
    check_shapes(ckpt.model_state, policy.state_dict(), where)
    missing, unexpected = policy.load_state_dict(ckpt.model_state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{where} does not match a {kind} policy built from its "
                          f"config.yaml: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    problem = policy.state_problem()
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    policy.checkpoint_path = Path(ckpt.path)
    return policy.to(device).eval()
