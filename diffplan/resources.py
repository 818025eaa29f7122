"""Shipped files by their repository path: ``configs/...``, ``checkpoints/...``.

In a checkout they are the repository's own folders. An installed wheel carries a subset as
package data under ``diffplan/`` with the same relative paths (``diffplan/configs/``, and from
``checkpoints/`` the demo checkpoint and the behavior snapshots; pyproject.toml lists them), so
``find("checkpoints/pointmaze-umaze/diffuser")`` works from any folder either way.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def roots() -> list[Path]:
    """Where shipped files are looked up: the repository checkout (when diffplan runs from one),
    then the installed package data."""
    checkout = [REPO_ROOT] if (REPO_ROOT / "pyproject.toml").is_file() else []
    return checkout + [PACKAGE_DIR]


def shipped(path: str | os.PathLike) -> Path | None:
    """The shipped file or folder at repository-relative ``path``, or None if none is here."""
    for root in roots():
        if (root / path).exists():
            return root / path
    return None


def find(path: str | os.PathLike, near: str | os.PathLike | None = None) -> Path:
    """A path a user gave: as given when it exists (or is absolute); else, with ``near`` (a file or
    folder that named it, such as a checkpoint whose config names its critic), relative to the
    nearest folder above ``near`` where it exists, so a repository-relative path in a checkpoint's
    config works from any folder; else the shipped file or folder of that repository-relative path;
    else unchanged (so the caller's error names it)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    if near is not None:
        for folder in Path(near).resolve().parents:
            if (folder / p).exists():
                return folder / p
    return shipped(p) or p
