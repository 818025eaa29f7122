"""Locomotion scores: the behavior policies and the datasets made from them.

Dataset part (this file so far): for every shipped behavior family, the snapshots' evaluated
returns, which snapshot the recipes pick as medium / expert, and -- with ``--datasets`` -- the
generated datasets' size, episode count, mean episode return and D4RL-normalized score (D4RL's own
medium datasets average about 44 / 40 / 62 for hopper / halfcheetah / walker2d), with generation
time.

    python benchmarks/locomotion_scores.py                       # snapshots only (seconds)
    python benchmarks/locomotion_scores.py --datasets --steps 100000   # scaled-down datasets
    python benchmarks/locomotion_scores.py --datasets            # full size (minutes per dataset)

Writes ``outputs/benchmarks/locomotion_datasets.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from diffplan.envs import locomotion as L
from diffplan.envs.behavior import D4RL_REF, d4rl_normalized


def snapshot_rows() -> list[dict]:
    rows = []
    for fam in L.FAMILIES:
        snaps = L.list_snapshots(fam)
        if not snaps:
            continue
        med, exp = L.medium_snapshot(fam), L.expert_snapshot(fam)
        for s in snaps:
            role = "medium" if s == med else "expert" if s == exp else ""
            rows.append({"family": fam, "snapshot": s.path.name, "train_step": s.step,
                         "eval_return": s.ret, "d4rl_score": s.score, "role": role})
    return rows


def episode_returns(d: dict[str, np.ndarray]) -> np.ndarray:
    ends = np.flatnonzero(d["terminals"] | d["timeouts"]) + 1
    if len(ends) == 0 or ends[-1] != len(d["rewards"]):
        ends = np.r_[ends, len(d["rewards"])]
    return np.add.reduceat(d["rewards"].astype(np.float64), np.r_[0, ends[:-1]])


def dataset_rows(steps: int | None, num_envs: int, families, kinds) -> list[dict]:
    rows = []
    for fam in families:
        if not L.list_snapshots(fam):
            print(f"# {fam}: no shipped snapshots, skipped")
            continue
        env_id = L.FAMILIES[fam]
        for kind in kinds:
            t0 = time.time()
            d, info = L.generate(fam, kind, steps=steps, num_envs=num_envs, progress=True)
            dt = time.time() - t0
            rets = episode_returns(d)
            rows.append({"task": f"{fam}-{kind}", "steps": int(len(d["rewards"])),
                         "episodes": int(len(rets)), "return_mean": float(rets.mean()),
                         "d4rl_score": d4rl_normalized(env_id, float(rets.mean())),
                         "terminals": int(d["terminals"].sum()), "timeouts": int(d["timeouts"].sum()),
                         "gen_s": round(dt, 1), "steps_per_s": round(len(d["rewards"]) / dt),
                         "segments": info["segments"]})
    return rows


def _md(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.1f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--datasets", action="store_true", help="also generate the datasets")
    p.add_argument("--steps", type=int, default=None, help="scale each dataset to this many steps")
    p.add_argument("--num-envs", type=int, default=L.DEFAULT_NUM_ENVS)
    p.add_argument("--families", nargs="*", default=list(L.FAMILIES))
    p.add_argument("--kinds", nargs="*", default=list(L.KINDS))
    p.add_argument("--out", default="outputs/benchmarks/locomotion_datasets.json")
    a = p.parse_args(argv)
    result = {"d4rl_ref": D4RL_REF, "random_return_v5": L.RANDOM_RETURN_V5,
              "medium_target": L.MEDIUM_TARGET, "snapshots": snapshot_rows()}
    print(_md(result["snapshots"], ["family", "snapshot", "eval_return", "d4rl_score", "role"]))
    if a.datasets:
        result["datasets"] = dataset_rows(a.steps, a.num_envs, a.families, a.kinds)
        print()
        print(_md(result["datasets"], ["task", "steps", "episodes", "return_mean", "d4rl_score",
                                        "terminals", "timeouts", "gen_s", "steps_per_s"]))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
