"""Task cards and the task registry.

A `TaskCard` names everything needed to reproduce a task: the Gymnasium env and its kwargs for
data collection and for evaluation, the episode length, the reference returns used for the D4RL
normalized score (measured here, with D4RL's numbers kept beside them), and the dataset recipe.
Families (mazes, locomotion) supply the behaviour through three builders, so one card type fits
all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from diffplan.data import OfflineDataset

# Modules that register task cards when imported; loaded on the first registry lookup. A module
# that does not exist (yet) is skipped.
TASK_MODULES = ("diffplan.envs.maze", "diffplan.envs.locomotion")


class UnknownTaskError(ValueError):
    """A task name that is not in the registry."""


@dataclass(frozen=True, eq=False)
class TaskCard:
    """One task: env, eval protocol, reference scores and dataset recipe.

    name: registry name, e.g. ``"pointmaze-umaze"``.
    env_id: Gymnasium id, e.g. ``"PointMaze_UMaze-v3"``.
    collect_kwargs / eval_kwargs: `gym.make` kwargs for data collection / evaluation.
    episode_steps: length of an evaluation episode.
    ref_min_score / ref_max_score: returns that map to 0 / 100, measured in the eval env.
    ref_note: how they were measured (policies, episodes, seeds, which expert).
    d4rl_ref_min_score / d4rl_ref_max_score: D4RL's numbers for the nearest D4RL task (context).
    recipe: the dataset recipe in words; dataset_steps / dataset_seed: its size and seed.
    build_dataset(card, steps, seed, progress) -> OfflineDataset: runs the recipe.
    build_env(card, render_mode) -> gym.Env: the evaluation env (eval protocol included).
    build_expert(card) -> policy or None: the controller that scores `ref_max_score`.
    is_goal_env: observations are dicts with 'observation' / 'desired_goal'.
    family: "maze", "locomotion", ...; extras: family facts (maze map, goal cell, ...).
    """

    name: str
    env_id: str
    collect_kwargs: Mapping[str, Any]
    eval_kwargs: Mapping[str, Any]
    episode_steps: int
    ref_min_score: float
    ref_max_score: float
    ref_note: str
    recipe: str
    dataset_steps: int
    dataset_seed: int
    build_dataset: Callable[..., OfflineDataset]
    build_env: Callable[..., gym.Env]
    build_expert: Callable[..., Any] | None = None
    d4rl_ref_min_score: float | None = None
    d4rl_ref_max_score: float | None = None
    is_goal_env: bool = False
    family: str = ""
    dataset_version: int = 0
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dataset_id(self) -> str:
        """The Minari id the made dataset is cached under, e.g. ``diffplan/pointmaze-umaze-v0``; a
        card named for its version (``hopper-medium-v1``) is not suffixed twice."""
        suffix = f"-v{self.dataset_version}"
        return f"diffplan/{self.name.removesuffix(suffix)}{suffix}"

    def make_dataset(self, progress: bool = True, *, steps: int | None = None,
                     seed: int | None = None) -> OfflineDataset:
        """Run the recipe (`dataset_steps` / `dataset_seed` unless given); no caching."""
        data = self.build_dataset(self, steps or self.dataset_steps,
                                  self.dataset_seed if seed is None else seed, progress)
        return data.replace(env_id=self.env_id, env_kwargs=dict(self.collect_kwargs),
                            ref_min_score=self.ref_min_score, ref_max_score=self.ref_max_score,
                            task=self.name)

    def make_env(self, render_mode: str | None = None) -> gym.Env:
        """The evaluation env, with the task's eval protocol and time limit."""
        return self.build_env(self, render_mode)

    def make_expert(self) -> Any:
        """The controller behind `ref_max_score` (a policy with `reset` / `act`)."""
        if self.build_expert is None:
            raise NotImplementedError(f"task '{self.name}' has no expert controller")
        return self.build_expert(self)

    def eval_env_spec(self) -> gym.envs.registration.EnvSpec:
        """The `EnvSpec` of `make_env()` (stored in the Minari dataset as its eval env)."""
        env = self.make_env()
        try:
            return env.spec
        finally:
            env.close()

    def normalized_score(self, returns: float | np.ndarray) -> float | np.ndarray:
        """D4RL normalized score against this card's references: 100 (R - min) / (max - min)."""
        score = 100.0 * (np.asarray(returns, dtype=np.float64) - self.ref_min_score) / (
            self.ref_max_score - self.ref_min_score)
        return float(score) if score.ndim == 0 else score

    def dataset_health(self) -> tuple[str, str]:
        """``("made", "")``, or the cached dataset's state (missing, incomplete, corrupt) and
        what is wrong (`diffplan.data.minari_dataset_health`)."""
        from diffplan.data import minari_dataset_health
        return minari_dataset_health(self.dataset_id, made_by_diffplan=True)

    def dataset_is_made(self) -> bool:
        """True when the dataset is cached, complete and whole, under MINARI_DATASETS_PATH."""
        return self.dataset_health()[0] == "made"

    def load_dataset(self, progress: bool = True, force: bool = False) -> OfflineDataset:
        """The task's dataset: read from the Minari cache, or made and cached first
        (always made when `force`, and remade with a warning when the cache is damaged)."""
        from diffplan.data import from_minari

        state, problem = self.dataset_health()
        if state == "made" and not force:
            return from_minari(self.dataset_id)
        if state != "missing" and not force:
            warnings.warn(f"{self.name}: the cached dataset is {state} ({problem}); remaking it",
                          stacklevel=2)
        data = self.cache_dataset(progress=progress, force=force)
        return from_minari(self.dataset_id) if data is None else data

    def cache_dataset(self, progress: bool = True, force: bool = False) -> OfflineDataset | None:
        """Make the dataset and cache it, unless a whole one is cached (always when `force`);
        None when it was. Callers at once (DDP ranks, two ``data make``) make it once: the
        others wait on a lock file, then find it made. A replaced dataset stays whole until the
        new one is (`to_minari`)."""
        from diffplan.data import recover_minari_datasets

        with _make_lock(self.dataset_id):
            recover_minari_datasets(self.dataset_id)  # settle what a killed writer left
            if not force and self.dataset_is_made():
                return None
            data = self.make_dataset(progress=progress)
            data.to_minari(self.dataset_id, force=True, eval_env=self.eval_env_spec(),
                           description=self.recipe,
                           algorithm_name=f"diffplan recipe: {self.name}", progress=progress)
        return data

    def replace(self, **changes: Any) -> TaskCard:
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        return (f"TaskCard({self.name!r}, env_id={self.env_id!r}, episode_steps="
                f"{self.episode_steps}, refs=({self.ref_min_score}, {self.ref_max_score}))")


@contextlib.contextmanager
def _make_lock(dataset_id: str):
    """An exclusive lock file in the Minari root's hidden ``.locks`` folder (which Minari's
    listings skip); POSIX only, a no-op elsewhere."""
    from diffplan.data import datasets_root

    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = datasets_root() / ".locks" / (dataset_id.replace("/", "__") + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_REGISTRY: dict[str, TaskCard] = {}
_modules_loaded = False


def register_task(card: TaskCard, *, overwrite: bool = False) -> TaskCard:
    """Add `card` to the registry (a second card with the same name needs `overwrite`)."""
    if not isinstance(card, TaskCard):
        raise TypeError(f"register_task expects a TaskCard, got {type(card).__name__}")
    if card.name in _REGISTRY and not overwrite and _REGISTRY[card.name] is not card:
        raise ValueError(f"task '{card.name}' is already registered")
    _REGISTRY[card.name] = card
    return card


def get_task(name: str) -> TaskCard:
    """The card registered as `name`; unknown names raise `UnknownTaskError` listing the known."""
    if isinstance(name, TaskCard):
        return name
    _load_task_modules()
    if name not in _REGISTRY:
        base, _, version = name.rpartition("-v")
        hint = ""
        if version.isdigit() and base in _REGISTRY:
            hint = f"; '{base}' has no version {version} here"
        raise UnknownTaskError(f"unknown task '{name}'{hint}; known tasks: {', '.join(list_tasks())}")
    return _REGISTRY[name]


def list_tasks() -> list[str]:
    """Registered task names, sorted."""
    _load_task_modules()
    return sorted(_REGISTRY)


def _load_task_modules() -> None:
    global _modules_loaded
    if _modules_loaded:
        return
    _modules_loaded = True  # set first: a task module may look tasks up while it registers
    try:
        for module in TASK_MODULES:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                if err.name != module:
                    raise
    except BaseException:
        _modules_loaded = False  # fail again, loudly, on the next lookup
        raise
