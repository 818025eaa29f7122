"""A flat ``.npz`` of the dataset arrays plus a JSON metadata string (no pickle)."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from diffplan import atomic
from diffplan.data.dataset import (
    ARRAY_KEYS,
    METADATA_KEYS,
    DatasetError,
    OfflineDataset,
)

_META_KEY = "metadata_json"


def from_npz(path: str | os.PathLike) -> OfflineDataset:
    """Read a file written by `to_npz` (or any npz holding the D4RL keys)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"no such npz file: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ARRAY_KEYS if key in npz.files}
            raw = str(npz[_META_KEY]) if _META_KEY in npz.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DatasetError(f"could not read {path} as npz (corrupt, or holds pickled objects): "
                           f"{err}") from None
    for key in ("observations", "actions", "rewards", "terminals"):
        if key not in arrays:
            raise DatasetError(f"{path} is missing the required array '{key}'")
    arrays.setdefault("timeouts", np.zeros(len(arrays["rewards"]), dtype=bool))
    meta = {}
    if raw is not None:
        try:
            meta = {k: v for k, v in json.loads(raw).items() if k in METADATA_KEYS}
        except ValueError:
            raise DatasetError(f"{path}: '{_META_KEY}' is not valid JSON") from None
    meta.setdefault("source", f"npz:{path.name}")
    return OfflineDataset(**arrays, **meta)


def to_npz(data: OfflineDataset, path: str | os.PathLike) -> None:
    """Write an uncompressed npz (fast to read); the path gets a ``.npz`` suffix if it lacks one."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {key: getattr(data, key) for key in ARRAY_KEYS if getattr(data, key) is not None}
    meta = {_META_KEY: np.array(json.dumps(data.metadata()))}
    atomic.replace_file(path, lambda tmp: np.savez(tmp, **arrays, **meta))  # never a half-written file
