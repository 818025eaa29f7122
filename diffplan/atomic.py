"""Folders that are written whole or not at all, and the recovery after a writer was killed.

A writer fills a hidden sibling ``.tmp-<name>-<pid>/``, marks it complete last (how is the
caller's: a marker file for checkpoints, a metadata flag for datasets), then `swap_into_place`
renames the folder in place (if any) to ``.old-<name>-<pid>/``, the new one to ``<name>`` and
deletes the old one. A kill at any point leaves a complete copy: in place or, between the two
renames, under a hidden name. `recover` puts that copy back and deletes the rest; it never
deletes the only complete copy.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

_LEFTOVER_RE = re.compile(r"^\.(tmp|old)-(.+)-(\d+)$")


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Replace the file `path` whole: ``write(tmp)`` fills a hidden sibling ``.<name>.tmp-<pid>``
    (the name keeps `path`'s suffix last, for writers that add one), which is fsynced and renamed
    over `path`. Readers see the old file or the new one, never part of one; if ``write`` raises,
    the sibling is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_file(path: Path, text: str) -> None:
    """Replace the file `path` by `text` whole (see `replace_file`)."""
    replace_file(path, lambda tmp: tmp.write_text(text))


def temp_sibling(dest: Path) -> Path:
    """A fresh, empty ``.tmp-<name>-<pid>`` folder beside `dest` for this process to write."""
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename the complete folder `tmp` to `dest`, replacing what is there.

    A folder cannot be renamed over a non-empty one, so the old `dest` steps aside to
    ``.old-<name>-<pid>`` first; between the two renames `dest` is briefly absent, never partial.
    """
    if dest.exists():
        old = dest.parent / f".old-{dest.name}-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)


def _leftovers(parent: Path, name: str | None = None) -> list[tuple[Path, str, str]]:
    """``(path, kind, target name)`` of the ``.tmp-*`` / ``.old-*`` folders in `parent` whose
    writer is no longer running (only those for `name`, if given)."""
    if not parent.is_dir():
        return []
    found = []
    for entry in sorted(parent.iterdir()):
        m = _LEFTOVER_RE.match(entry.name)
        if m and (name is None or m.group(2) == name) and not _alive(int(m.group(3))):
            found.append((entry, m.group(1), m.group(2)))
    return found


def recover(parent: Path, is_complete: Callable[[Path], bool], name: str | None = None, *,
            dry_run: bool = False) -> list[tuple[Path, Path | None]]:
    """Settle what killed writers left in `parent` (only for `name`, if given).

    A final folder that is missing gets back the newest complete copy: a ``.tmp-*`` that
    `is_complete`, else the ``.old-*`` (it was in place, so it is as complete as that was). Every
    other leftover of a dead writer is deleted. Returns ``(leftover, final folder)`` for each
    one put back and ``(leftover, None)`` for each one deleted; `dry_run` only returns them.
    """
    done: list[tuple[Path, Path | None]] = []
    restored: set[Path] = set()
    # "tmp" sorts after "old": visit the newer copies first.
    for path, kind, target in sorted(_leftovers(parent, name), key=lambda x: x[1], reverse=True):
        dest = parent / target
        restore = (kind == "old" or is_complete(path)) and not dest.exists() and dest not in restored
        if restore:
            restored.add(dest)
        done.append((path, dest if restore else None))
        if dry_run:
            continue
        try:
            if restore:
                os.rename(path, dest)
            else:
                shutil.rmtree(path)
        except FileNotFoundError:  # another process settled it first
            pass
    return done


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier failed attempt
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
