"""Trajectory Diffuser against Diffuser: the speed/score front of both, on the same episodes.

For every maze where both have a checkpoint (``checkpoints/<task>/{diffuser,trajectory_diffuser}``)
it runs, in one run and on the same env seeds and seeded plan noise:

* the Diffuser at every solver step count its ``tune_steps.json`` tried (``diffplan tune-steps``;
  1, 2, 3, 5, 10 where it has none), so the baseline is met at its own best setting, not at one
  chosen for it;
* the Trajectory Diffuser at each refinement step count its ``tune_steps.json`` tried, plus its
  draft alone (k=0) and the un-noised reference variant;
* normalized score (mean ± standard error) against the waypoint expert and against the
  near-time-optimal controller; U-Net and drafter passes per plan; plan latency at batch 1 (an
  ``act`` that replans, the planners interleaved so that load on the shared CPU hits all alike).

From these it reports the front (rows no other row beats on both score and plan latency) and the
comparison the claim needs: the Diffuser's fastest setting within 2 points of its best score
against the TD as configured. The table is printed and appended, with date, machine and commit,
to ``benchmarks/RESULTS.md``.

    python benchmarks/trajectory_diffuser_vs_diffuser.py --episodes 100
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_rows, stamp

ROOT = Path(__file__).resolve().parents[1]
HEADER = ["date", "machine", "commit", "task", "planner", "episodes", "score (expert = 100)",
          "score (near-optimal = 100)", "U-Net evals / plan", "drafter passes / plan", "plan p10 ms", "plan p50 ms",
          "plan p99 ms", "on the front", "vs Diffuser's fastest within 2 of its best"]
DESCRIPTION = ("`python benchmarks/trajectory_diffuser_vs_diffuser.py`: every planner on the same episodes "
               "(env seeds `seed..seed+episodes-1`) with seeded plan noise; the Diffuser at every step count "
               "`diffplan tune-steps` tried. Plan latency is an `act` that replans, at batch 1, the planners "
               "interleaved; on a shared, loaded CPU the p50 includes time descheduled, and p10 approximates a "
               "quiet machine, so speed-ups are taken at p10. \"on the front\": no other row scores higher "
               "and plans faster. The last column compares with the Diffuser's fastest setting whose score is "
               "within 2 points of its best: plan speed-up at p10, and score difference.")
DEFAULT_STEPS = (1, 2, 3, 5, 10)


def tried_steps(checkpoint: Path, fallback) -> list[int]:
    """The step counts ``diffplan tune-steps`` evaluated for a checkpoint (``fallback`` if none)."""
    path = Path(checkpoint) / "tune_steps.json"
    if path.is_file():
        return [int(r["steps"]) for r in json.loads(path.read_text())["rows"]]
    return list(fallback)


def variant(policy, overrides: dict):
    """A copy of ``policy`` sharing its weights, with config fields overridden."""
    v = copy.copy(policy)
    v.config = dataclasses.replace(policy.config, **overrides)
    from diffplan.runtime.planner import Planner

    v.planner = Planner(v, copy.deepcopy(policy.planner.config))
    return v


def count_calls(module) -> tuple[dict, list]:
    state = {"calls": 0}
    hook = module.register_forward_hook(lambda *_: state.__setitem__("calls", state["calls"] + 1))
    return state, [hook]


def plan_latencies(policies: dict, obs, rounds: int) -> dict:
    """Interleaved replanning ``act`` calls at batch 1: name -> (latencies ms, U-Net, drafter passes)."""
    out = {name: [] for name in policies}
    evals = {}
    for name, p in policies.items():  # warm-up and network-evaluation counts
        unet, h1 = count_calls(p.net)
        drafter, h2 = count_calls(p.drafter) if hasattr(p, "drafter") else ({"calls": 0}, [])
        for _ in range(3):
            p.reset()
            p.act(obs)
        for h in h1 + h2:
            h.remove()
        evals[name] = (unet["calls"] / 3, drafter["calls"] / 3)
    for _ in range(rounds):
        for name, p in policies.items():
            p.reset()
            t0 = time.perf_counter()
            p.act(obs)
            out[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (np.asarray(out[name]), *evals[name]) for name in policies}


def front(rows: dict) -> set[str]:
    """Names of the rows that no other row beats on both score and plan p10 latency."""
    return {a for a, r in rows.items()
            if not any(o["score"] >= r["score"] and o["plan_p10"] <= r["plan_p10"]
                       and (o["score"] > r["score"] or o["plan_p10"] < r["plan_p10"])
                       for b, o in rows.items() if b != a)}


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="*", default=["pointmaze-umaze", "pointmaze-medium", "pointmaze-large"])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--num-envs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency-rounds", type=int, default=60)
    ap.add_argument("--margin", type=float, default=2.0,
                    help="score points from the Diffuser's best that count as equal (default 2)")
    ap.add_argument("--diffuser", help="Diffuser checkpoint (default checkpoints/<task>/diffuser)")
    ap.add_argument("--td", help="TrajectoryDiffuser checkpoint (default checkpoints/<task>/trajectory_diffuser)")
    ap.add_argument("--extra-td", nargs="*", default=[], metavar="LABEL=PATH",
                    help="more TrajectoryDiffuser checkpoints to run as configured, e.g. stride32=runs/x")
    ap.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from diffplan.eval import evaluate
    from diffplan.policies import load_policy
    from diffplan.runtime.bench import example_observations

    all_rows = []
    for task in args.tasks:
        paths = {k: ROOT / "checkpoints" / task / k for k in ("diffuser", "trajectory_diffuser")}
        if args.diffuser:
            paths["diffuser"] = Path(args.diffuser)
        if args.td:
            paths["trajectory_diffuser"] = Path(args.td)
        if not all((p / "config.yaml").is_file() or (p / "checkpoints").is_dir() for p in paths.values()):
            print(f"{task}: skipped (needs both {paths['diffuser']} and {paths['trajectory_diffuser']})")
            continue
        diffuser = load_policy(paths["diffuser"], task=task)
        td = load_policy(paths["trajectory_diffuser"], task=task)
        planners = {}
        for k in tried_steps(diffuser.checkpoint_path, DEFAULT_STEPS):
            planners[f"Diffuser {diffuser.config.solver}-{k}"] = variant(diffuser, {"steps": k})
        k_td = td.config.refine_steps
        configured = f"TD k={k_td} (as configured{', the draft alone' if k_td == 0 else ''})"
        planners[configured] = td
        for k in tried_steps(td.checkpoint_path, ()):
            if k != k_td:
                planners[f"TD k={k}"] = variant(td, {"refine_steps": k})
        if k_td != 0:
            planners["TD k=0 (draft only)"] = variant(td, {"refine_steps": 0})
        if td.config.noise_draft and k_td != 0:
            planners[f"TD k={k_td}, un-noised draft (reference)"] = variant(td, {"noise_draft": False})
        for spec in args.extra_td:
            label, _, path = spec.partition("=")
            planners[f"TD {label}"] = load_policy(path, task=task)
        for p in planners.values():
            p.planner.config.seed = args.seed  # seeded plan noise: same draws for every planner

        rows = {}
        for name, p in planners.items():
            t0 = time.perf_counter()
            report = evaluate(p, task, episodes=args.episodes, num_envs=args.num_envs, seed=args.seed)
            rows[name] = {"score": report.normalized_mean, "se": report.normalized_stderr,
                          "opt": report.extra.get("optimal_normalized_mean", float("nan")),
                          "opt_se": report.extra.get("optimal_normalized_stderr", float("nan"))}
            print(f"{task} | {name}: {report.normalized_mean:.1f} ± {report.normalized_stderr:.1f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        obs = example_observations(diffuser, 1, seed=args.seed)
        for name, (ms, unet, drafter) in plan_latencies(planners, obs, args.latency_rounds).items():
            rows[name].update(plan_p10=float(np.percentile(ms, 10)), plan_p50=float(np.percentile(ms, 50)),
                              plan_p99=float(np.percentile(ms, 99)), unet=unet, drafter=drafter)
        diff_rows = {n: r for n, r in rows.items() if n.startswith("Diffuser")}
        best = max(r["score"] for r in diff_rows.values())
        ref_name = min((n for n, r in diff_rows.items() if r["score"] >= best - args.margin),
                       key=lambda n: diff_rows[n]["plan_p10"])
        ref = rows[ref_name]
        on_front = front(rows)
        table = []
        for name, r in rows.items():
            cmp = ("reference" if name == ref_name else
                   f"{ref['plan_p10'] / r['plan_p10']:.2f}x faster, {r['score'] - ref['score']:+.1f} "
                   f"(best Diffuser {best:.1f})")
            table.append([task, name, str(args.episodes), f"{r['score']:.1f} ± {r['se']:.1f}",
                          f"{r['opt']:.1f} ± {r['opt_se']:.1f}", f"{r['unet']:.0f}", f"{r['drafter']:.0f}",
                          f"{r['plan_p10']:.2f}", f"{r['plan_p50']:.2f}", f"{r['plan_p99']:.2f}",
                          "yes" if name in on_front else "", cmp])
        all_rows += [stamp() + row for row in table]
        print("\n".join(" | ".join(row) for row in [HEADER[3:]] + table) + "\n", flush=True)

    if all_rows and not args.no_write:
        path = append_rows("trajectory_diffuser_vs_diffuser", DESCRIPTION, HEADER, all_rows)
        print(f"appended to {path}")
    return all_rows


if __name__ == "__main__":
    main()
