"""Tune a maze planner's acting settings on tuning seeds, and record the grid.

    python benchmarks/maze_tuning.py CHECKPOINT [--episodes 30] [--replan 0,64,32] [--speed 1,1.25,1.5]
                                     [--t-start 0.2,0.4,0.6] [--noise-draft 1,0]

Evaluates every combination of: replanning interval (``runtime.n_action_steps``; 0 = plan once per
episode, Diffuser's maze protocol), PD ``track_speed``, and for a Trajectory Diffuser its ``t_start``
and ``noise_draft``, on env seeds 1000.. (reported scores use seeds from 0). Prints the grid best
first and appends it to ``benchmarks/RESULTS.md``; ``--write`` stores the best setting in the
checkpoint's ``config.yaml``.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_rows, stamp  # noqa: E402

PLAN_ONCE = 100_000


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--num-envs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--replan", default="0,64,32", help="replanning intervals in env steps (0: plan once)")
    ap.add_argument("--speed", default="1,1.25,1.5", help="PD track_speed values")
    ap.add_argument("--t-start", default="", help="TD only: t_start values (default: the config's)")
    ap.add_argument("--noise-draft", default="", help="TD only: 1,0 (default: the config's)")
    ap.add_argument("--write", action="store_true", help="store the best setting in the checkpoint's config.yaml")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from diffplan.eval import evaluate
    from diffplan.policies import load_policy

    policy = load_policy(args.checkpoint)
    base_cfg, runtime = policy.config, policy.planner.config
    grid = {"n_action_steps": [int(v) or PLAN_ONCE for v in floats(args.replan)],
            "track_speed": floats(args.speed)}
    if policy.kind == "trajectory_diffuser":
        grid["t_start"] = floats(args.t_start) or [base_cfg.t_start]
        grid["noise_draft"] = [bool(int(v)) for v in floats(args.noise_draft)] or [base_cfg.noise_draft]
    results = []
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        policy.config = dataclasses.replace(base_cfg, **{k: v for k, v in setting.items() if k != "n_action_steps"})
        runtime.n_action_steps = setting["n_action_steps"]
        t0 = time.perf_counter()
        report = evaluate(policy, policy.spec.task, episodes=args.episodes, num_envs=args.num_envs, seed=args.seed)
        results.append((report.normalized_mean, report.normalized_stderr,
                        report.extra.get("optimal_normalized_mean", float("nan")), setting))
        print(f"{setting}: {report.normalized_mean:.1f} ± {report.normalized_stderr:.1f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    results.sort(key=lambda r: -r[0])
    label = lambda s: ", ".join(f"{k}={'once' if v == PLAN_ONCE else v}" for k, v in s.items())
    rows = [stamp() + [policy.spec.task, policy.kind, str(args.checkpoint), label(s), str(args.episodes),
                       f"{m:.1f} ± {se:.1f}", f"{opt:.1f}"] for m, se, opt, s in results]
    append_rows("maze_tuning", "`python benchmarks/maze_tuning.py`: acting settings of maze planners on tuning seeds "
                "(env seeds 1000..), best first; the shipped config takes the first row.",
                ["date", "machine", "commit", "task", "policy", "checkpoint", "setting", "episodes",
                 "score (expert = 100)", "score (near-optimal = 100)"], rows)
    best = results[0][3]
    print(f"best: {label(best)}")
    if args.write:
        from diffplan.eval.tune import update_policy_config

        fields = {k: v for k, v in best.items() if k != "n_action_steps"}
        path = update_policy_config(getattr(policy, "checkpoint_path", args.checkpoint), fields,
                                    runtime={"n_action_steps": best["n_action_steps"]})
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
