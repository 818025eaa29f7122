"""Checkpoint folders: safetensors for tensors, YAML/JSON for everything else, written atomically.

A checkpoint is a folder::

    step-00005000/
        model.safetensors        weights for inference (the trainer writes the EMA weights here)
        config.yaml              everything needed to rebuild the model
        optimizer.safetensors    resume only: raw params, EMA shadow, AdamW moments
        trainer_state.json       resume only: step, optimizer hyperparameters, EMA counters, seeds
        metrics.json             written later by `diffplan eval`; never touched here

Nothing is pickled. State-dict entries that are not tensors (a module's ``get_extra_state``) travel
as JSON in the safetensors header metadata under ``diffplan.non_tensor``.

Writes go to a hidden sibling ``.tmp-<name>-<pid>/``, are fsynced, marked complete (an empty
``.complete`` file, written last) and renamed into place (`diffplan.atomic`), so a crash mid-write
never leaves a half checkpoint where a loader looks: loaders only consider ``step-<n>`` folders and
ignore anything starting with a dot. `recover_checkpoints` puts back a complete copy that a crash
between the two renames of a rewrite left under a hidden name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from diffplan import atomic
from diffplan.config import load_yaml

__all__ = [
    "CONFIG_FILE",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "TRAINER_STATE_FILE",
    "Checkpoint",
    "CheckpointError",
    "check_shapes",
    "checkpoint_dirs",
    "latest_checkpoint",
    "load_checkpoint",
    "recover_checkpoints",
    "save_checkpoint",
    "step_dir_name",
]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
COMPLETE_FILE = ".complete"  # written last: a folder holding it was written whole
CHECKPOINTS_SUBDIR = "checkpoints"
_OWN_FILES = (MODEL_FILE, CONFIG_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE, COMPLETE_FILE)
_NON_TENSOR_KEY = "diffplan.non_tensor"
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or unreadable. The message names the file."""


@dataclass
class Checkpoint:
    model_state: dict[str, Any]
    config: dict[str, Any]
    optimizer_tensors: dict[str, Any] | None
    trainer_state: dict[str, Any] | None
    path: Path


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def check_shapes(state: dict[str, Any], expected: dict[str, Any], where: str | os.PathLike) -> None:
    """``CheckpointError`` naming the first tensor, in the order of ``expected`` (a freshly built
    module's ``state_dict()``), whose shape in ``state`` differs, with both shapes."""
    for name, want in expected.items():
        value = state.get(name)
        if isinstance(value, torch.Tensor) and isinstance(want, torch.Tensor) and value.shape != want.shape:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(value.shape)}, but the model "
                                  f"built from config.yaml expects {tuple(want.shape)}")


# ----------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(
    dir: str | os.PathLike,
    model_state: dict[str, Any],
    config: dict[str, Any],
    optimizer_tensors: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder at ``dir`` atomically and return its path.

    If ``dir`` already exists it is replaced, but files this module does not own (``metrics.json``,
    plots) are carried over into the new folder.
    """
    dest = Path(dir)
    tmp = atomic.temp_sibling(dest)
    try:
        _write_file(tmp / MODEL_FILE, _encode_safetensors(model_state, MODEL_FILE))
        _write_file(tmp / CONFIG_FILE, _encode_yaml(config))
        if optimizer_tensors is not None:
            _write_file(
                tmp / OPTIMIZER_FILE,
                _encode_safetensors(optimizer_tensors, OPTIMIZER_FILE),
            )
        if trainer_state is not None:
            _write_file(tmp / TRAINER_STATE_FILE, _encode_json(trainer_state))
        if dest.exists():
            _carry_over_foreign_files(dest, tmp)
        _write_file(tmp / COMPLETE_FILE, b"")
        _fsync_dir(tmp)
        atomic.swap_into_place(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _carry_over_foreign_files(src: Path, dst: Path) -> None:
    for entry in src.iterdir():
        if entry.name in _OWN_FILES:
            continue
        target = dst / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target)
        else:
            shutil.copy2(entry, target)
            with open(target, "rb") as f:
                os.fsync(f.fileno())


def _encode_safetensors(state: dict[str, Any], filename: str) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    non_tensor: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"{filename}: state key {key!r} is not a string")
        if isinstance(value, torch.Tensor):
            # Cloning detaches shared storage (tied weights), which safetensors refuses.
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        else:
            non_tensor[key] = _to_plain(value, f"{filename}: entry {key!r}")
    metadata = {"format": "pt"}
    if non_tensor:
        metadata[_NON_TENSOR_KEY] = json.dumps(non_tensor)
    return _st_save(tensors, metadata=metadata)


def _encode_yaml(config: dict[str, Any]) -> bytes:
    if not isinstance(config, dict):
        raise TypeError(f"{CONFIG_FILE}: config must be a dict, got {type(config).__name__}")
    return yaml.safe_dump(_to_plain(config, CONFIG_FILE), sort_keys=False).encode()


def _encode_json(state: dict[str, Any]) -> bytes:
    return (json.dumps(_to_plain(state, TRAINER_STATE_FILE), indent=2) + "\n").encode()


def _to_plain(obj: Any, where: str) -> Any:
    """Numpy scalars, tuples and paths to plain JSON/YAML types; anything else is an error."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _to_plain(v, where) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v, where) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{where}: cannot store a {type(obj).__name__} without pickle")


# ----------------------------------------------------------------------------------------------
# Finding and reading


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """All ``step-<n>`` checkpoint folders of a run (or of a ``checkpoints/`` folder), oldest first."""
    root = Path(run_dir)
    if (root / CHECKPOINTS_SUBDIR).is_dir():
        root = root / CHECKPOINTS_SUBDIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_RE.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest ``step-<n>`` folder under ``run_dir/checkpoints`` (hidden ``.tmp-*`` ignored)."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def recover_checkpoints(folder: str | os.PathLike, *,
                        dry_run: bool = False) -> list[tuple[Path, Path | None]]:
    """After a crash: put back the complete checkpoints a killed `save_checkpoint` left under
    hidden names in `folder` (e.g. a run's ``checkpoints/``) and delete its partial ones
    (`diffplan.atomic.recover`)."""
    return atomic.recover(Path(folder), _is_complete, dry_run=dry_run)


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_FILE).is_file()


def load_checkpoint(dir: str | os.PathLike, *, resume_state: bool = True) -> Checkpoint:
    """Read a checkpoint folder, or the latest checkpoint of a run folder. Tensors land on CPU.

    ``resume_state=False`` skips the resume-only files (optimizer, trainer state), so loading for
    inference does not depend on them; they are then None in the result.
    """
    path = Path(dir)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint folder does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (a checkpoint is a folder holding {MODEL_FILE})")
    if not (path / MODEL_FILE).exists() and not (path / CONFIG_FILE).exists():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(
                f"{path}: no {MODEL_FILE} here and no step-* checkpoints under {path / CHECKPOINTS_SUBDIR}"
            )
        path = latest
    model_state = _read_safetensors(path / MODEL_FILE)
    config = _read_yaml(path / CONFIG_FILE)
    opt_path, ts_path = path / OPTIMIZER_FILE, path / TRAINER_STATE_FILE
    optimizer_tensors = _read_safetensors(opt_path) if resume_state and opt_path.exists() else None
    trainer_state = _read_json(ts_path) if resume_state and ts_path.exists() else None
    return Checkpoint(model_state, config, optimizer_tensors, trainer_state, path)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from checkpoint folder {path.parent}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e


def _read_safetensors(path: Path) -> dict[str, Any]:
    data = _read_bytes(path)
    try:
        state: dict[str, Any] = dict(_st_load(data))
        (header_len,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        extra = metadata.get(_NON_TENSOR_KEY)
        if extra is not None:
            state.update(json.loads(extra))
    except Exception as e:  # safetensors raises its own SafetensorError; re-raise with the path
        raise CheckpointError(
            f"{path}: corrupt or truncated safetensors file ({len(data)} bytes): {e}"
        ) from e
    return state


def _read_yaml(path: Path) -> dict[str, Any]:
    text = _read_bytes(path)
    try:
        config = load_yaml(text)
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: invalid YAML: {e}") from e
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a mapping at the top level, got {type(config).__name__}")
    return config


def _read_json(path: Path) -> dict[str, Any]:
    text = _read_bytes(path)
    try:
        state = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(state).__name__}")
    return state
