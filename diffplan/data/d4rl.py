"""D4RL's HDF5 layout: flat arrays at the file root.

Keys: ``observations, actions, rewards, terminals`` (required), ``timeouts`` and
``next_observations`` (optional), ``infos/goal`` (optional, maze2d's goal per step). diffplan's
metadata is written as a JSON string in the root attribute ``diffplan_metadata``; files written by
D4RL itself have none, and load with empty metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from diffplan import atomic
from diffplan.data.dataset import METADATA_KEYS, DatasetError, OfflineDataset

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")
_META_ATTR = "diffplan_metadata"


def from_d4rl_hdf5(path: str | os.PathLike) -> OfflineDataset:
    """Read a D4RL-style HDF5 file. Without ``timeouts``, only terminals (and the end of the
    arrays) end episodes."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"no such HDF5 file: {path}")
    try:
        with h5py.File(path, "r") as file:
            missing = [key for key in REQUIRED_KEYS if key not in file]
            if missing:
                raise DatasetError(f"{path} is missing the required key '{missing[0]}' "
                                   f"(D4RL layout needs {', '.join(REQUIRED_KEYS)}; "
                                   f"the file has {', '.join(sorted(file.keys())) or 'no keys'})")
            arrays = {key: _read(file, key, path) for key in REQUIRED_KEYS}
            n = len(arrays["rewards"])
            arrays["timeouts"] = (_read(file, "timeouts", path) if "timeouts" in file
                                  else np.zeros(n, dtype=bool))
            if "next_observations" in file:
                arrays["next_observations"] = _read(file, "next_observations", path)
            if "infos/goal" in file:
                arrays["goals"] = _read(file, "infos/goal", path)
            meta = _read_meta(file, path)
    except DatasetError:
        raise
    except (OSError, KeyError, TypeError) as err:
        raise DatasetError(f"could not read {path} as HDF5 (corrupt or not an HDF5 file): "
                           f"{err}") from None
    meta.setdefault("source", f"d4rl-hdf5:{path.name}")
    return OfflineDataset(**arrays, **meta)


def to_d4rl_hdf5(data: OfflineDataset, path: str | os.PathLike) -> None:
    """Write `data` in D4RL's layout (with ``timeouts``, and ``infos/goal`` for goal datasets)."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as file:
            for key in ("observations", "actions", "rewards", "terminals", "timeouts",
                        "next_observations"):
                value = getattr(data, key)
                if value is not None:
                    file.create_dataset(key, data=value)
            if data.goals is not None:
                file.create_dataset("infos/goal", data=data.goals)
            file.attrs[_META_ATTR] = json.dumps(data.metadata())

    atomic.replace_file(path, write)  # readers never see a half-written file


def _read(file, key: str, path: Path) -> np.ndarray:
    import h5py
    node = file[key]
    if not isinstance(node, h5py.Dataset):
        raise DatasetError(f"{path}: '{key}' is a group, expected an array")
    return node[()]


def _read_meta(file, path: Path) -> dict:
    raw = file.attrs.get(_META_ATTR)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: attribute '{_META_ATTR}' is not valid JSON") from None
    return {key: meta[key] for key in METADATA_KEYS if key in meta}
