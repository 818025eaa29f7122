"""Score the shipped maze checkpoints over many episodes and record them in RESULTS.md.

    python benchmarks/maze_scores.py [--episodes 100] [--kinds diffuser,trajectory_diffuser,anchored]

For each ``checkpoints/pointmaze-*/<kind>/`` it evaluates the policy on its task (same seeds for
every policy) and records the normalized score (mean ± standard error) against the waypoint expert
and against the near-time-optimal controller, success rate, act latency, and what the training
cost: steps, wall time and steps/s (from ``train.json``) and size. Each checkpoint's
``metrics.json`` is rewritten from this run (``--no-record``: neither).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_rows, stamp, training_facts  # noqa: E402

from diffplan.eval import evaluate  # noqa: E402
from diffplan.policies import load_policy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--num-envs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="", help="comma-separated policy kinds (default: all shipped)")
    parser.add_argument("--tasks", default="", help="comma-separated maze tasks (default: all shipped)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    kinds = set(filter(None, args.kinds.split(",")))
    tasks = set(filter(None, args.tasks.split(",")))
    rows = []
    for ckpt in sorted(ROOT.glob("checkpoints/pointmaze-*/*/model.safetensors")):
        folder = ckpt.parent
        if (kinds and folder.name not in kinds) or (tasks and folder.parent.name not in tasks):
            continue
        policy = load_policy(folder)
        report = evaluate(policy, policy.spec.task, episodes=args.episodes, num_envs=args.num_envs,
                          seed=args.seed, progress=True)
        print(report.summary())
        if not args.no_record:
            report.write_metrics(folder)
        train = training_facts(folder)
        size_mb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
        params = sum(p.numel() for p in policy.parameters())
        rows.append(stamp() + [
            policy.spec.task, policy.kind, str(report.episodes),
            f"{report.normalized_mean:.1f} ± {report.normalized_stderr:.1f}",
            f"{report.extra['optimal_normalized_mean']:.1f} ± {report.extra['optimal_normalized_stderr']:.1f}",
            f"{100 * report.success_rate:.0f}%", f"{report.latency_p50_ms:.2f}",
            f"{report.decisions_per_s:.0f}", str(train.get("steps", "?")),
            train.get("wall", "?"), train.get("steps_per_s", "?"), f"{params / 1e6:.2f}M / {size_mb:.1f} MB"])
    if not rows:
        print("no shipped maze checkpoints found under checkpoints/pointmaze-*/")
        return 1
    if not args.no_record:
        path = append_rows(
            "maze_scores",
            "`python benchmarks/maze_scores.py`: shipped maze checkpoints on their task's eval protocol "
            "(fixed goal cell, random start, seeds 0..N-1, sparse reward), normalized against the "
            "task card's measured references (random policy = 0, noise-free waypoint expert = 100; "
            "second score: the near-time-optimal controller = 100). "
            "act latency is per call for 10 envs at once; decisions/s counts env decisions.",
            ["date", "machine", "commit", "task", "policy", "episodes", "normalized score",
             "vs near-optimal", "success", "act p50 ms (10 envs)", "decisions/s", "train steps", "train wall",
             "train steps/s", "params / size"], rows)
        print(f"recorded in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
