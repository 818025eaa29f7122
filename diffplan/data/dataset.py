"""`OfflineDataset`: flat step arrays of an offline RL dataset, plus its metadata.

Every step ``i`` belongs to exactly one episode. An episode ends at step ``i`` iff
``terminals[i] or timeouts[i]``; the last step of the arrays always closes the last episode, even
when neither flag is set there. Loaders (`from_minari`, `from_d4rl_hdf5`, `from_npz`) and writers
(`to_minari`, `to_d4rl_hdf5`, `to_npz`) live in their own modules; the methods here delegate.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np


class DatasetError(ValueError):
    """A dataset is missing, malformed, or asked for something it does not hold."""


# Float arrays that must be finite, and the rank they must have.
_FLOAT_KEYS = {"observations": 2, "actions": 2, "rewards": 1, "goals": 2, "next_observations": 2}
_FLAG_KEYS = ("terminals", "timeouts")
ARRAY_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts", "goals",
              "next_observations")
METADATA_KEYS = ("env_id", "env_kwargs", "ref_min_score", "ref_max_score", "source", "task")


@dataclass(eq=False)
class OfflineDataset:
    """Offline transitions as flat arrays (D4RL layout), validated on construction.

    Arrays (N = number of steps):
        observations: (N, obs_dim) float32; for goal envs only the 'observation' part.
        actions: (N, act_dim) float32.
        rewards: (N,) float32.
        terminals: (N,) bool, the env said `terminated` at this step.
        timeouts: (N,) bool, the episode was cut here (time limit, goal change, end of data).
        goals: (N, goal_dim) float32 or None; the desired goal in force at step i.
        next_observations: (N, obs_dim) float32 or None.
    Metadata: env_id and env_kwargs (the env that produced the data), ref_min_score and
    ref_max_score (for the D4RL normalized score), source (free text: where it came from),
    task (a diffplan task name, or None).

    Float inputs are cast to float32 and 0/1 flags to bool; anything else that is wrong raises
    `DatasetError` naming the key.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    goals: np.ndarray | None = None
    next_observations: np.ndarray | None = None
    env_id: str = ""
    env_kwargs: dict = field(default_factory=dict)
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    source: str = ""
    task: str | None = None

    def __post_init__(self) -> None:
        n = None
        for key, ndim in _FLOAT_KEYS.items():
            value = getattr(self, key)
            if value is None:
                if key in ("goals", "next_observations"):
                    continue
                raise DatasetError(f"'{key}' is required but is None")
            arr = _as_float32(key, value, ndim)
            n = _check_length(key, arr, n)
            setattr(self, key, arr)
        for key in _FLAG_KEYS:
            arr = _as_flags(key, getattr(self, key))
            n = _check_length(key, arr, n)
            setattr(self, key, arr)
        if n == 0:
            raise DatasetError("the dataset is empty (0 steps)")
        if self.next_observations is not None and self.next_observations.shape[1:] != \
                self.observations.shape[1:]:
            raise DatasetError(
                f"'next_observations' has rows of shape {self.next_observations.shape[1:]}, "
                f"but 'observations' has {self.observations.shape[1:]}")
        if not isinstance(self.env_kwargs, dict):
            raise DatasetError(f"'env_kwargs' must be a dict, got {type(self.env_kwargs).__name__}")
        for key in ("ref_min_score", "ref_max_score"):
            value = getattr(self, key)
            if value is not None:
                if not np.isfinite(value):
                    raise DatasetError(f"'{key}' must be a finite number, got {value!r}")
                setattr(self, key, float(value))
        if (self.ref_min_score is not None and self.ref_max_score is not None
                and self.ref_max_score <= self.ref_min_score):
            raise DatasetError(f"'ref_max_score' ({self.ref_max_score}) must exceed "
                               f"'ref_min_score' ({self.ref_min_score})")

    # ---- episode structure ------------------------------------------------------------------

    @cached_property
    def episode_ends(self) -> np.ndarray:
        """(E,) int64 exclusive end index of every episode."""
        ends = np.flatnonzero(self.terminals | self.timeouts) + 1
        if len(ends) == 0 or ends[-1] != len(self):
            ends = np.append(ends, len(self))
        return ends.astype(np.int64)

    @property
    def episode_starts(self) -> np.ndarray:
        """(E,) int64 first index of every episode."""
        return np.concatenate([[0], self.episode_ends[:-1]]).astype(np.int64)

    @property
    def episode_lengths(self) -> np.ndarray:
        """(E,) int64 number of steps of every episode."""
        return self.episode_ends - self.episode_starts

    @property
    def num_episodes(self) -> int:
        return len(self.episode_ends)

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def is_goal_dataset(self) -> bool:
        return self.goals is not None

    def episodes(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield one dict of array slices (views) per episode, keys as in `ARRAY_KEYS`."""
        for start, end in zip(self.episode_starts, self.episode_ends):
            yield {key: getattr(self, key)[start:end] for key in ARRAY_KEYS
                   if getattr(self, key) is not None}

    def episode_returns(self) -> np.ndarray:
        """(E,) float64 undiscounted return of every episode."""
        return np.add.reduceat(self.rewards.astype(np.float64), self.episode_starts)

    # ---- scores and summaries ---------------------------------------------------------------

    def normalized_score(self, returns: float | np.ndarray) -> float | np.ndarray:
        """D4RL normalized score: 100 * (R - ref_min) / (ref_max - ref_min)."""
        if self.ref_min_score is None or self.ref_max_score is None:
            raise DatasetError(f"dataset '{self.task or self.source}' has no reference scores "
                               "(ref_min_score / ref_max_score), so it cannot normalize returns")
        score = 100.0 * (np.asarray(returns, dtype=np.float64) - self.ref_min_score) / (
            self.ref_max_score - self.ref_min_score)
        return float(score) if score.ndim == 0 else score

    def summary(self) -> dict[str, Any]:
        """Counts, episode length and return statistics, reference scores (JSON-serializable)."""
        lengths = self.episode_lengths
        returns = self.episode_returns()
        out: dict[str, Any] = {
            "task": self.task,
            "env_id": self.env_id,
            "source": self.source,
            "num_steps": len(self),
            "num_episodes": self.num_episodes,
            "obs_dim": int(self.observations.shape[1]),
            "act_dim": int(self.actions.shape[1]),
            "goal_dim": None if self.goals is None else int(self.goals.shape[1]),
            "num_terminals": int(self.terminals.sum()),
            "num_timeouts": int(self.timeouts.sum()),
            "episode_length": _stats(lengths),
            "episode_return": _stats(returns),
            "reward": {"min": float(self.rewards.min()), "max": float(self.rewards.max()),
                       "mean": float(self.rewards.mean())},
            "ref_min_score": self.ref_min_score,
            "ref_max_score": self.ref_max_score,
        }
        return out

    def metadata(self) -> dict[str, Any]:
        """The metadata fields as a JSON-serializable dict (what writers store beside arrays)."""
        meta = {key: getattr(self, key) for key in METADATA_KEYS}
        try:
            json.dumps(meta)
        except TypeError as err:
            raise DatasetError(f"dataset metadata is not JSON-serializable: {err}") from None
        return meta

    def replace(self, **changes: Any) -> OfflineDataset:
        """A copy with some fields replaced (validated again)."""
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        goal = "" if self.goals is None else f", goal_dim={self.goals.shape[1]}"
        return (f"OfflineDataset(task={self.task!r}, env_id={self.env_id!r}, steps={len(self)}, "
                f"episodes={self.num_episodes}, obs_dim={self.observations.shape[1]}, "
                f"act_dim={self.actions.shape[1]}{goal})")

    # ---- writers (implemented beside their readers) -----------------------------------------

    def to_minari(self, dataset_id: str, **kwargs: Any):
        """Write as a local Minari dataset; see `diffplan.data.minari_io.to_minari`."""
        from diffplan.data.minari_io import to_minari
        return to_minari(self, dataset_id, **kwargs)

    def to_d4rl_hdf5(self, path) -> None:
        """Write D4RL's HDF5 layout; see `diffplan.data.d4rl.to_d4rl_hdf5`."""
        from diffplan.data.d4rl import to_d4rl_hdf5
        to_d4rl_hdf5(self, path)

    def to_npz(self, path) -> None:
        """Write an uncompressed .npz; see `diffplan.data.npz.to_npz`."""
        from diffplan.data.npz import to_npz
        to_npz(self, path)


def _as_float32(key: str, value: Any, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
            or arr.dtype == bool):
        raise DatasetError(f"'{key}' must hold numbers, got dtype {arr.dtype}")
    if ndim == 1 and arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]  # D4RL files sometimes store rewards as (N, 1)
    if arr.ndim != ndim:
        want = "(N,)" if ndim == 1 else "(N, dim)"
        raise DatasetError(f"'{key}' must have shape {want}, got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.flatnonzero(~finite.reshape(len(arr), -1).all(axis=1))
        raise DatasetError(f"'{key}' has non-finite values (NaN or inf) at {len(bad)} step(s); "
                           f"first bad index {int(bad[0])}")
    return arr


def _as_flags(key: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DatasetError(f"'{key}' must have shape (N,), got {arr.shape}")
    if arr.dtype != bool:
        if not (np.issubdtype(arr.dtype, np.number)) or not np.isin(arr, (0, 1)).all():
            raise DatasetError(f"'{key}' must be booleans (or 0/1), got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return np.ascontiguousarray(arr)


def _check_length(key: str, arr: np.ndarray, n: int | None) -> int:
    if n is not None and len(arr) != n:
        raise DatasetError(f"'{key}' has {len(arr)} steps but 'observations' has {n}; "
                           "all arrays must have the same length")
    return len(arr)


def _stats(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, dtype=np.float64)
    return {"min": float(x.min()), "p10": float(np.percentile(x, 10)),
            "median": float(np.median(x)), "p90": float(np.percentile(x, 90)),
            "max": float(x.max()), "mean": float(x.mean()), "std": float(x.std())}
