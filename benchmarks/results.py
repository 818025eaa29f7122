"""Shared by the benchmark scripts: machine and commit stamps, and appending to RESULTS.md.

Each script owns one ``## name`` section of ``benchmarks/RESULTS.md`` holding one table; a run
appends its rows under that table (creating the file, section or table as needed), so results
accumulate with their date, machine and commit.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cpus, "
            f"Python {platform.python_version()}, OMP_NUM_THREADS={threads}")


def commit() -> str:
    """Short HEAD, with ``+dirty`` when diffplan/ or envs/ have uncommitted changes
    (``DIFFPLAN_COMMIT`` when set: a copy of the tree without its git folder, e.g. on a lent GPU)."""
    if os.environ.get("DIFFPLAN_COMMIT"):
        return os.environ["DIFFPLAN_COMMIT"]
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=RESULTS.parent).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "--", "../diffplan", "../envs")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stamp() -> list[str]:
    """The first three cells of every row: date, machine, commit."""
    return [str(datetime.date.today()), machine(), commit()]


def append_rows(section: str, description: str, header: list[str], rows: list[list[str]],
                note: str | None = None) -> Path:
    """Append ``rows`` to the table of ``## section`` (made with ``description`` and ``header``)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    title = f"## {section}"
    head = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    body = "".join("| " + " | ".join(r) + " |\n" for r in rows)
    if title not in text:
        text = text.rstrip("\n") + f"\n\n{title}\n\n{description}\n\n{head}{body}"
    else:
        start = text.index(title)
        nxt = text.find("\n## ", start + len(title))
        end = len(text) if nxt < 0 else nxt + 1
        lines = text[start:end].splitlines(keepends=True)
        table = [i for i, line in enumerate(lines) if line.startswith("|")]
        if table and lines[table[0]].strip() == head.splitlines()[0].strip():
            lines.insert(table[-1] + 1, body)
        else:  # the columns changed: start a new table under the old one
            lines.append(f"\n{head}{body}")
        text = text[:start] + "".join(lines) + text[end:]
    if note:
        text = text.rstrip("\n") + f"\n\n{note}\n"
    RESULTS.write_text(text)
    return RESULTS


def training_facts(folder: Path) -> dict:
    """A shipped checkpoint's training steps (trainer state, else train.json) and wall time as
    ``"wall"`` (e.g. ``"12 min"``, from train.json); keys are absent where unknown."""
    out = {}
    state = Path(folder) / "trainer_state.json"
    if state.exists():
        out["steps"] = json.loads(state.read_text()).get("step")
    info = Path(folder) / "train.json"
    if info.exists():
        data = json.loads(info.read_text())
        if out.get("steps") is None:
            out["steps"] = data.get("steps")
        if "wall_s" in data:
            out["wall"] = f"{data['wall_s'] / 60:.0f} min"
        if "steps_per_s" in data:
            out["steps_per_s"] = f"{data['steps_per_s']:.1f}"
    return out
