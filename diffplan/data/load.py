"""`load(name)`: one entry point for task names, local Minari ids and dataset files."""

from __future__ import annotations

import os
from pathlib import Path

from diffplan.data.dataset import DatasetError, OfflineDataset

_HDF5_SUFFIXES = (".hdf5", ".h5")


def load(name: str | os.PathLike, *, progress: bool = True) -> OfflineDataset:
    """Resolve `name`, in order, as:

    1. a diffplan task name (``diffplan data list``): its dataset is made on first use and cached
       as a Minari dataset under MINARI_DATASETS_PATH;
    2. the id of a Minari dataset on this machine;
    3. a path: ``.hdf5``/``.h5`` (D4RL layout), ``.npz``, or a Minari data folder.
    """
    # The one upward import of diffplan.data: task names live in the env registry.
    from diffplan.envs import get_task, list_tasks

    text = os.fspath(name)
    tasks = list_tasks()
    if text in tasks:
        return get_task(text).load_dataset(progress=progress)

    path = Path(text)
    if path.suffix in _HDF5_SUFFIXES or path.suffix == ".npz" or path.is_dir():
        if not path.exists():
            raise DatasetError(f"no such file: {path}")
        if path.suffix in _HDF5_SUFFIXES:
            from diffplan.data.d4rl import from_d4rl_hdf5
            return from_d4rl_hdf5(path)
        if path.suffix == ".npz":
            from diffplan.data.npz import from_npz
            return from_npz(path)
        from diffplan.data.minari_io import from_minari
        data_dir = path / "data" if (path / "data" / "metadata.json").is_file() else path
        return from_minari(data_dir)

    from diffplan.data.minari_io import from_minari, minari_dataset_exists
    try:
        local = minari_dataset_exists(text)
    except DatasetError:
        local = False  # not even a well-formed Minari id
    if local:
        return from_minari(text)
    raise DatasetError(
        f"unknown dataset '{text}': not a task name (known tasks: {', '.join(tasks) or 'none'}), "
        "not a Minari dataset on this machine, and not a .hdf5/.npz file or Minari folder")
