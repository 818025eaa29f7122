"""Read and write `OfflineDataset`s as local Minari datasets (no downloads, no jax).

Minari stores one group per episode, with T+1 observations (the final one included) and T of
everything else. Goal envs store dict observations; diffplan keeps ``observation`` as
`observations` and ``desired_goal`` as `goals`. diffplan's own metadata (env kwargs, task, source,
whether next observations are real) rides in the Minari metadata under the key ``"diffplan"``;
the reference scores go in Minari's own ``ref_min_score`` / ``ref_max_score``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from diffplan import atomic
from diffplan.data.dataset import DatasetError, OfflineDataset

_META_KEY = "diffplan"


def datasets_root() -> Path:
    """The folder Minari reads and writes: $MINARI_DATASETS_PATH, else ~/.minari/datasets."""
    root = os.environ.get("MINARI_DATASETS_PATH")
    return Path(root) if root else Path.home() / ".minari" / "datasets"


def dataset_path(dataset_id: str) -> Path:
    """Folder of a Minari dataset id (it need not exist)."""
    _parse_id(dataset_id)
    return datasets_root() / dataset_id


def minari_dataset_exists(dataset_id: str, *, complete_only: bool = False) -> bool:
    """True if `dataset_id` is on this machine; `complete_only` also asks that diffplan finished
    writing it and that its files agree with its metadata (`minari_dataset_health`)."""
    if complete_only:
        return minari_dataset_health(dataset_id, made_by_diffplan=True)[0] == "made"
    return (dataset_path(dataset_id) / "data" / "metadata.json").is_file()


def minari_dataset_health(dataset_id: str, *, made_by_diffplan: bool = False) -> tuple[str, str]:
    """``("made", "")`` for a whole local dataset, else ``(state, what is wrong)`` with state
    ``"missing"``, ``"incomplete"`` (its writer did not finish) or ``"corrupt"`` (its files
    disagree with its metadata). `made_by_diffplan` also asks for diffplan's completion mark."""
    return _health(dataset_path(dataset_id) / "data", made_by_diffplan)


def _health(data_dir: Path, made_by_diffplan: bool = False) -> tuple[str, str]:
    meta_file = data_dir / "metadata.json"
    if not meta_file.is_file():
        return "missing", f"{meta_file} does not exist"
    try:
        meta = json.loads(meta_file.read_text())
        episodes, steps = int(meta["total_episodes"]), int(meta["total_steps"])
        ours = meta.get(_META_KEY)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return "corrupt", f"{meta_file} is unreadable ({type(err).__name__}: {err})"
    if (ours is None and made_by_diffplan) or (ours is not None and ours.get("complete") is not True):
        return "incomplete", "its writer did not finish (no 'complete' mark in metadata.json)"
    if meta.get("data_format", "hdf5") != "hdf5":
        return "made", ""  # other formats are only checked when read
    import h5py

    file = data_dir / "main_data.hdf5"
    if not file.is_file():
        return "corrupt", f"{file} is missing"
    try:
        with h5py.File(file, "r") as f:
            names = list(f.keys())
            found = sum(h5py.h5d.open(h5py.h5g.open(f.id, name.encode()), b"rewards").shape[0]
                        for name in names)
    except (OSError, KeyError, ValueError) as err:
        return "corrupt", f"{file} is unreadable ({err})"
    if (len(names), found) != (episodes, steps):
        return "corrupt", (f"metadata.json says {episodes:,} episodes and {steps:,} steps, but "
                           f"main_data.hdf5 holds {len(names):,} episodes and {found:,} steps")
    return "made", ""


def recover_minari_datasets(dataset_id: str | None = None, *,
                            dry_run: bool = False) -> list[tuple[Path, Path | None]]:
    """Put back a dataset that a `to_minari` killed between its two renames left under a hidden
    name, and delete killed writers' partial copies (`diffplan.atomic.recover`): those of
    `dataset_id`, or all under the Minari root."""
    if dataset_id is not None:
        path = dataset_path(dataset_id)
        return atomic.recover(path.parent, _is_whole, path.name, dry_run=dry_run)
    return [step for folder in _walk()[1] for step in atomic.recover(folder, _is_whole, dry_run=dry_run)]


def local_minari_datasets() -> list[str]:
    """The ids of the datasets under the Minari root, whole or not."""
    root = datasets_root()
    return sorted(path.relative_to(root).as_posix() for path in _walk()[0])


def _is_whole(folder: Path) -> bool:
    return _health(folder / "data", made_by_diffplan=True)[0] == "made"


def _walk() -> tuple[list[Path], list[Path]]:
    """(dataset folders, namespace folders) under the Minari root; hidden folders skipped."""
    datasets, namespaces = [], []
    for parent, children, _ in os.walk(datasets_root()):
        namespaces.append(Path(parent))
        children[:] = [c for c in children if not c.startswith(".")]
        found = [c for c in children if (Path(parent) / c / "data").is_dir()]
        datasets += [Path(parent) / c for c in found]
        children[:] = [c for c in children if c not in found]
    return datasets, namespaces


def delete_minari_dataset(dataset_id: str) -> None:
    """Remove a local Minari dataset folder, if present."""
    path = dataset_path(dataset_id)
    if path.exists():
        shutil.rmtree(path)


def from_minari(dataset: Any) -> OfflineDataset:
    """Flatten a Minari dataset (an id of a local dataset, a data folder, or a `MinariDataset`).

    Dict observations must hold an ``observation`` key; ``desired_goal`` becomes `goals`.
    Episodes whose last step is neither terminated nor truncated are closed with a timeout, so
    episode boundaries survive flattening.
    """
    import minari

    if isinstance(dataset, str):
        dataset_id = dataset
        path = dataset_path(dataset_id) / "data"
        if not path.is_dir():
            raise DatasetError(
                f"Minari dataset '{dataset_id}' is not on this machine (looked in {path}). "
                "diffplan cannot download datasets (no internet access is assumed). If it is a "
                "diffplan task, make it with `diffplan data make NAME` (see `diffplan data list`); "
                "otherwise place the dataset folder under the Minari root "
                f"(MINARI_DATASETS_PATH, now {datasets_root()}).")
        dataset = _open(path)
    elif isinstance(dataset, (os.PathLike,)):
        dataset = _open(Path(dataset))
    elif not isinstance(dataset, minari.MinariDataset):
        raise DatasetError(f"from_minari expects a dataset id, a path or a MinariDataset, "
                           f"got {type(dataset).__name__}")

    chunks: dict[str, list[np.ndarray]] = {k: [] for k in (
        "observations", "next_observations", "goals", "actions", "rewards", "terminals",
        "timeouts")}
    try:
        episodes = list(_iter_episodes(dataset))
    except (OSError, KeyError) as err:  # h5py's errors on damaged files
        raise DatasetError(_damaged(Path(dataset.storage.data_path), "corrupt",
                                    f"reading it failed ({err})")) from None
    for ep_id, obs, actions, rewards, terminations, truncations in episodes:
        if isinstance(obs, dict):
            if "observation" not in obs:
                raise DatasetError(f"Minari dataset '{dataset.id}' has dict observations with keys "
                                   f"{sorted(obs)}; diffplan needs an 'observation' key")
            goal = obs.get("desired_goal")
            obs = obs["observation"]
        elif isinstance(obs, np.ndarray):
            goal = None
        else:
            raise DatasetError(f"Minari dataset '{dataset.id}' has observations of type "
                               f"{type(obs).__name__}; diffplan reads arrays or dicts of arrays")
        t = len(rewards)
        obs = np.asarray(obs).reshape(len(obs), -1)
        if len(obs) != t + 1:
            raise DatasetError(f"Minari dataset '{dataset.id}' episode {ep_id} has "
                               f"{len(obs)} observations for {t} steps (expected {t + 1})")
        chunks["observations"].append(obs[:-1])
        chunks["next_observations"].append(obs[1:])
        if goal is not None:
            chunks["goals"].append(np.asarray(goal).reshape(t + 1, -1)[:-1])
        chunks["actions"].append(np.asarray(actions).reshape(t, -1))
        chunks["rewards"].append(np.asarray(rewards).reshape(t))
        terminals = np.asarray(terminations, dtype=bool).reshape(t)
        timeouts = np.array(truncations, dtype=bool).reshape(t)
        if t and not (terminals[-1] or timeouts[-1]):
            timeouts[-1] = True  # keep the episode boundary after flattening
        chunks["terminals"].append(terminals)
        chunks["timeouts"].append(timeouts)
    if not chunks["rewards"]:
        raise DatasetError(f"Minari dataset '{dataset.id}' has no episodes")

    meta = dataset.storage.metadata
    ours = meta.get(_META_KEY, {})
    env_spec = dataset.env_spec
    if chunks["goals"] and len(chunks["goals"]) != len(chunks["rewards"]):
        raise DatasetError(f"Minari dataset '{dataset.id}' has 'desired_goal' in some episodes only")
    arrays = {k: np.concatenate(v) for k, v in chunks.items() if v}
    if not ours.get("has_next_observations", True):
        arrays.pop("next_observations")
    return OfflineDataset(
        **arrays,
        env_id=ours.get("env_id", env_spec.id if env_spec is not None else ""),
        env_kwargs=ours.get("env_kwargs", _jsonable(env_spec.kwargs) if env_spec else {}),
        ref_min_score=meta.get("ref_min_score"),
        ref_max_score=meta.get("ref_max_score"),
        source=ours.get("source", f"minari:{dataset.id}"),
        task=ours.get("task"),
    )


def _iter_episodes(dataset) -> Iterator[tuple]:
    """Yield (id, observations, actions, rewards, terminations, truncations) per episode.

    HDF5 datasets of flat Box spaces (everything diffplan writes) are read straight from the file
    with h5py's low-level API: Minari's reader opens objects through the high-level API per
    episode and is about 3x slower (20 s against 6 s for 1M steps in 13k episodes here).
    """
    meta = dataset.storage.metadata
    obs_space, act_space = dataset.observation_space, dataset.action_space
    flat = isinstance(obs_space, gym.spaces.Box) or (
        isinstance(obs_space, gym.spaces.Dict)
        and all(isinstance(s, gym.spaces.Box) for s in obs_space.spaces.values()))
    if meta.get("data_format") != "hdf5" or not flat or not isinstance(act_space, gym.spaces.Box) \
            or any(_is_image(s) for s in (act_space, *_leaves(obs_space))):
        for ep in dataset.iterate_episodes():
            yield (ep.id, ep.observations, ep.actions, ep.rewards, ep.terminations,
                   ep.truncations)
        return

    import h5py

    def read(parent, name: str) -> np.ndarray:
        dset = h5py.h5d.open(parent, name.encode())
        out = np.empty(dset.shape, dtype=dset.dtype)
        if out.size:
            dset.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
        return out

    path = dataset.storage.data_path / "main_data.hdf5"
    with h5py.File(path, "r") as file:
        for ep_id in dataset.episode_indices:
            group = h5py.h5g.open(file.id, f"episode_{ep_id}".encode())
            if isinstance(obs_space, gym.spaces.Dict):
                obs_group = h5py.h5g.open(group, b"observations")
                obs = {key: read(obs_group, key) for key in obs_space.spaces}
            else:
                obs = read(group, "observations")
            yield (int(ep_id), obs, read(group, "actions"), read(group, "rewards"),
                   read(group, "terminations"), read(group, "truncations"))


def _leaves(space: gym.Space) -> list[gym.Space]:
    return list(space.spaces.values()) if isinstance(space, gym.spaces.Dict) else [space]


def _is_image(space: gym.Space) -> bool:
    from minari.dataset.minari_storage import is_image_space
    return is_image_space(space)


def to_minari(data: OfflineDataset, dataset_id: str, *, force: bool = False,
              eval_env: gym.envs.registration.EnvSpec | None = None,
              description: str | None = None, algorithm_name: str | None = None,
              author: str = "diffplan", code_permalink: str = "https://github.com/diffplan/diffplan",
              progress: bool = False):
    """Write `data` as a local Minari dataset `dataset_id` with `minari.create_dataset_from_buffers`.

    Goal datasets are written with dict observations ``{'observation', 'desired_goal'}``. The
    final observation of each episode is `next_observations[end - 1]` (or a repeat of the last
    observation when next observations are absent, which is recorded so a read gives None back).
    The env spec (id plus `env_kwargs`) is stored when the env id is registered in Gymnasium.
    Returns the `minari.MinariDataset`. `force` replaces an existing dataset.

    The dataset is written to a hidden sibling folder, marked complete last, then swapped into
    place (`diffplan.atomic`): a crash at any point leaves the old or the new dataset whole.
    """
    import minari
    from minari.dataset.minari_storage import MinariStorage
    from minari.namespace import create_namespace, list_local_namespaces
    from minari.utils import _generate_dataset_metadata  # minari is pinned to one version

    _check_next_observations(data)
    path = dataset_path(dataset_id)
    if path.exists() and not force:
        raise DatasetError(f"Minari dataset '{dataset_id}' already exists at {path}; "
                           "pass force=True to replace it")

    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    box = lambda d: gym.spaces.Box(-np.inf, np.inf, shape=(d,), dtype=np.float32)
    if data.goals is not None:
        observation_space = gym.spaces.Dict(
            {"observation": box(obs_dim), "desired_goal": box(data.goals.shape[1])})
    else:
        observation_space = box(obs_dim)
    env_spec = _env_spec(data.env_id, data.env_kwargs)
    action_space = box(act_dim)
    if env_spec is not None:
        real = gym.make(env_spec).action_space
        if isinstance(real, gym.spaces.Box) and real.shape == (act_dim,):
            action_space = gym.spaces.Box(real.low, real.high, dtype=np.float32)

    buffers = _episode_buffers(data)
    if progress:
        from tqdm.auto import tqdm
        buffers = tqdm(buffers, total=data.num_episodes, desc=f"write {dataset_id}",
                       unit="ep")
    namespace = dataset_id.rpartition("/")[0]
    if namespace and namespace not in list_local_namespaces():
        create_namespace(namespace)
    tmp = atomic.temp_sibling(path)
    try:
        with warnings.catch_warnings():
            # Minari warns about every optional metadata field left empty.
            warnings.simplefilter("ignore", UserWarning)
            storage = MinariStorage.new(tmp / "data", observation_space=observation_space,
                                        action_space=action_space, env_spec=env_spec)
            storage.update_metadata(_generate_dataset_metadata(
                dataset_id, env_spec, eval_env, algorithm_name or data.source or "diffplan",
                author, None, code_permalink, None, None, None, 100,
                description or data.source or None, None))
        storage.update_episodes(buffers)
        extra: dict[str, Any] = {_META_KEY: {
            **data.metadata(),
            "has_next_observations": data.next_observations is not None,
            "complete": True,  # written last: a crash mid-write leaves no mark
        }}
        if data.ref_min_score is not None and data.ref_max_score is not None:
            extra.update(ref_min_score=data.ref_min_score, ref_max_score=data.ref_max_score,
                         num_episodes_average_score=100)
        storage.update_metadata(extra)
        atomic.swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return minari.MinariDataset(path / "data")


def _check_next_observations(data: OfflineDataset) -> None:
    """Minari keeps one observation sequence per episode, so inside an episode
    next_observations[i] must equal observations[i + 1]."""
    if data.next_observations is None or len(data) < 2:
        return
    inside = np.ones(len(data) - 1, dtype=bool)
    inside[data.episode_ends[:-1] - 1] = False
    same = (data.next_observations[:-1] == data.observations[1:]).all(axis=1)
    bad = np.flatnonzero(inside & ~same)
    if len(bad):
        raise DatasetError(
            f"next_observations[{bad[0]}] differs from observations[{bad[0] + 1}] inside an "
            "episode; Minari stores one observation sequence per episode, so it cannot hold these "
            "next observations (drop them with dataset.replace(next_observations=None))")


def _episode_buffers(data: OfflineDataset) -> Iterator[Any]:
    """One `EpisodeBuffer` per episode, built lazily from array slices (no per-step Python)."""
    from minari.data_collector import EpisodeBuffer

    next_obs = data.next_observations
    for i, (start, end) in enumerate(zip(data.episode_starts, data.episode_ends)):
        last = next_obs[end - 1] if next_obs is not None else data.observations[end - 1]
        obs = np.concatenate([data.observations[start:end], last[None]])
        if data.goals is not None:
            goals = data.goals[start:end]
            obs = {"observation": obs, "desired_goal": np.concatenate([goals, goals[-1:]])}
        yield EpisodeBuffer(
            id=i,
            observations=obs,
            actions=data.actions[start:end],
            rewards=data.rewards[start:end],
            terminations=data.terminals[start:end],
            truncations=data.timeouts[start:end],
        )


def _env_spec(env_id: str, env_kwargs: dict) -> gym.envs.registration.EnvSpec | None:
    """The registered spec of `env_id` with `env_kwargs` merged in, or None if unknown."""
    if not env_id:
        return None
    register_gymnasium_robotics()
    try:
        spec = gym.spec(env_id)
    except gym.error.Error:
        return None
    return dataclasses.replace(spec, kwargs={**spec.kwargs, **env_kwargs})


def register_gymnasium_robotics() -> bool:
    """Register gymnasium-robotics' envs (PointMaze, ...) with Gymnasium; False if not installed.

    Its import prints a notice about Adroit envs to stderr on every run; it does not concern the
    envs diffplan uses, so it is swallowed here.
    """
    import contextlib
    import io
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import gymnasium_robotics
    except ImportError:
        return False
    gym.register_envs(gymnasium_robotics)
    return True


def _open(path: Path):
    """A `MinariDataset` for a data folder whose files agree with its metadata (`_health`)."""
    import minari
    state, problem = _health(path)
    if state == "missing":
        raise DatasetError(f"{path} is not a Minari data folder (no metadata.json)")
    if state != "made":
        raise DatasetError(_damaged(path, state, problem))
    try:
        return minari.MinariDataset(path)
    except (ValueError, OSError, KeyError) as err:
        raise DatasetError(f"could not open Minari dataset at {path}: {err}") from None


def _damaged(data_dir: Path, state: str, problem: str) -> str:
    """One line: which dataset is damaged, how, and the command that heals it."""
    try:
        meta = json.loads((data_dir / "metadata.json").read_text())
        task, name = meta[_META_KEY]["task"], meta["dataset_id"]
    except (OSError, ValueError, KeyError, TypeError):
        task, name = None, data_dir.parent.name
    return (f"Minari dataset '{name}' is {state}: {problem}; heal it with "
            f"`{remake_command(task, data_dir.parent)}`")


def remake_command(task: str | None, folder: Path) -> str:
    """The command that heals a damaged dataset: remake a task's; delete anything else's (and
    write it again)."""
    return f"diffplan data make {task} --force" if task else f"rm -r {folder}"


def _parse_id(dataset_id: str) -> None:
    from minari.dataset.minari_dataset import parse_dataset_id
    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError):
        raise DatasetError(f"'{dataset_id}' is not a valid Minari dataset id "
                           "(expected '(namespace/)name-v<version>')") from None


def _jsonable(kwargs: dict) -> dict:
    out = {}
    for key, value in kwargs.items():
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[key] = value
    return out
