"""Issue #23: how fast SAC reaches the medium level, and what its replay buffer holds by then.

    python benchmarks/behavior_pace.py RUN [RUN ...]

``RUN``: the ``--out`` folder of ``python -m diffplan.envs.behavior train`` (its progress.csv and
snapshots); the resumable state (``replay_buffer.pkl``) is read from ``RUN-state`` or ``--state``.
Per run it prints and records: the env steps per gradient step (``train_freq``), the first snapshot
whose deterministic eval reaches the family's medium level (44 / 40 / 62 D4RL-normalized, D4RL's
medium datasets), and what SAC's buffer held up to that step (the medium-replay dataset of that
run): steps, complete episodes, and their mean / min / max D4RL-normalized return. D4RL's
medium-replay sets (issue #23): hopper 0.40M steps, mean about 15; halfcheetah 0.20M, about 27;
walker2d 0.30M, about 15. A run that never reaches the medium level reports its whole buffer.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_rows, stamp  # noqa: E402

from diffplan.envs.behavior import D4RL_REF, d4rl_normalized  # noqa: E402
from diffplan.envs.locomotion import MEDIUM_TARGET  # noqa: E402


def buffer_episodes(state: Path, upto: int) -> np.ndarray:
    """Returns of the complete episodes in the first ``upto`` steps of SAC's replay buffer."""
    from stable_baselines3.common.save_util import load_from_pkl  # our own training state, not user input

    buf = load_from_pkl(state / "replay_buffer.pkl")
    n = min(upto, buf.buffer_size if buf.full else buf.pos)
    rewards, ends = buf.rewards[:n, 0], buf.dones[:n, 0] > 0  # dones: terminated or truncated
    stops = np.flatnonzero(ends) + 1
    return np.array([rewards[a:b].sum() for a, b in zip(np.r_[0, stops[:-1]], stops)])


def pace(run: Path, state: Path) -> list[str]:
    rows = list(csv.DictReader(open(run / "progress.csv")))
    meta = yaml.safe_load((run / rows[-1]["snapshot"] / "actor.yaml").read_text())
    env_id = meta["env_id"]
    family = env_id.split("-")[0].lower()
    extra = meta.get("extra") or {}
    freq = f"{extra.get('train_freq', 1) / extra.get('gradient_steps', 1):g}"  # env steps per gradient step
    target = MEDIUM_TARGET[{"halfcheetah": "halfcheetah", "hopper": "hopper", "walker2d": "walker2d"}[family]]
    reached = next((int(r["step"]) for r in rows if r["d4rl_score"] and float(r["d4rl_score"]) >= target), None)
    last = int(rows[-1]["step"])
    rets = buffer_episodes(state, reached or last)
    score = np.array([d4rl_normalized(env_id, r) for r in rets])
    best = max(float(r["d4rl_score"]) for r in rows if r["d4rl_score"])
    print(f"{run.name}: {env_id}, {freq} env steps per gradient step: medium ({target:g}) "
          f"{'at ' + format(reached, ',') if reached else 'not reached by ' + format(last, ',')} steps; "
          f"best eval {best:.1f}; buffer {reached or last:,} steps, {len(rets)} episodes, "
          f"normalized mean {score.mean():.1f} (min {score.min():.1f}, max {score.max():.1f})", flush=True)
    assert family in D4RL_REF
    return [*stamp(), run.name, env_id, freq, f"{reached:,}" if reached else f"not by {last:,}", f"{best:.1f}",
            f"{reached or last:,}", str(len(rets)), f"{score.mean():.1f}", f"{score.min():.1f}", f"{score.max():.1f}"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--state", type=Path, nargs="*", help="state folders, one per run (default RUN-state)")
    p.add_argument("--note")
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    states = a.state or [r.with_name(r.name + "-state") for r in a.runs]
    rows = [pace(r, s) for r, s in zip(a.runs, states)]
    if not a.no_record:
        append_rows("behavior pace", __doc__.split("\n\n")[1].replace("\n", " "),
                    ["date", "machine", "commit", "run", "env", "env steps per gradient step", "medium reached at",
                     "best eval", "buffer steps", "episodes", "mean", "min", "max"], rows, note=a.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
