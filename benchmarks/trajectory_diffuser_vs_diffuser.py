"""Trajectory Diffuser against Diffuser on the same episodes, seeds and CPU.

For every maze where both have a checkpoint (``checkpoints/<task>/{diffuser,trajectory_diffuser}``)
it measures, in one run:

* normalized score over ``--episodes`` episodes (mean ± standard error), every planner on the
  same env seeds (``evaluate(..., seed=--seed)``) and with seeded plan noise;
* network evaluations per plan: U-Net passes, and drafter (transformer) passes for TD;
* ``act`` latency p50/p99 at batch 1 (``diffplan.runtime.bench.bench_policy``: most calls only
  read an action off the current plan), and plan latency p50/p99 at batch 1: an ``act`` that
  replans, timed with the planners interleaved so that load on the shared CPU hits both alike.

Trajectory Diffuser is run as configured and in a few variants (refinement steps k, the
un-noised reference variant); ``--extra-td LABEL=PATH`` adds other TD checkpoints as configured
(e.g. the CFG teacher of the distilled refiner). The table is printed and appended, with date,
machine and commit, to ``benchmarks/RESULTS.md``.

    python benchmarks/trajectory_diffuser_vs_diffuser.py --episodes 100
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_rows, stamp

ROOT = Path(__file__).resolve().parents[1]
HEADER = ["date", "machine", "commit", "task", "planner", "episodes", "normalized score", "U-Net evals / plan",
          "drafter passes / plan", "plan p10 ms", "plan p50 ms", "plan p99 ms", "act p50 ms", "act p99 ms",
          "plan speed-up vs Diffuser", "score vs Diffuser"]
DESCRIPTION = ("`python benchmarks/trajectory_diffuser_vs_diffuser.py`: both planners on the same episodes "
               "(env seeds `seed..seed+episodes-1`) with seeded plan noise; plan latency is an `act` that "
               "replans, at batch 1, the planners interleaved; `act` latency from `bench_policy` (most calls "
               "read an action off the current plan). On a shared, loaded CPU the p50 includes time descheduled; "
               "p10 approximates a quiet machine. \"within 1 SE\" compares with Diffuser's standard error.")

# (label, overrides of the TD config); the first row is the checkpoint's own config. The shipped
# umaze refiner is guidance-distilled (its w=1 output stands for its teacher's w=3 CFG output), so
# guidance-weight variants are left out; the CFG teacher itself can be added with --extra-td.
VARIANTS = [
    ("as configured", {}),
    ("k=0 (draft only)", {"refine_steps": 0}),
    ("k=2", {"refine_steps": 2}),
    ("k=1, un-noised draft (reference)", {"refine_steps": 1, "noise_draft": False}),
]


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


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="*", default=["pointmaze-umaze", "pointmaze-medium", "pointmaze-large"])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--num-envs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency-rounds", type=int, default=100)
    ap.add_argument("--variants", type=int, default=len(VARIANTS), help="how many TD variants to run")
    ap.add_argument("--diffuser", help="Diffuser checkpoint (default checkpoints/<task>/diffuser)")
    ap.add_argument("--td", help="TrajectoryDiffuser checkpoint (default checkpoints/<task>/trajectory_diffuser)")
    ap.add_argument("--extra-td", nargs="*", default=[], metavar="LABEL=PATH",
                    help="more TrajectoryDiffuser checkpoints to run as configured, e.g. stride32=runs/x")
    ap.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from diffplan.eval import evaluate
    from diffplan.policies import load_policy
    from diffplan.runtime.bench import bench_policy, example_observations

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
        if (diffuser.config.dim, tuple(diffuser.config.dim_mults)) != (td.config.dim, tuple(td.config.dim_mults)):
            print(f"{task}: warning: U-Net sizes differ (diffuser dim {diffuser.config.dim} "
                  f"{diffuser.config.dim_mults}, td dim {td.config.dim} {td.config.dim_mults})")
        planners = {f"Diffuser ({diffuser.config.solver}-{diffuser.default_steps})": diffuser}
        for label, overrides in VARIANTS[: args.variants]:
            planners[f"TD {label}"] = variant(td, overrides)
        for spec in args.extra_td:
            label, _, path = spec.partition("=")
            extra = load_policy(path, task=task)
            planners[f"TD {label} (k={extra.config.refine_steps}, w={extra.config.guidance_w:g})"] = extra
        for p in planners.values():
            p.planner.config.seed = args.seed  # seeded plan noise: same draws for every planner

        rows = {}
        for name, p in planners.items():
            t0 = time.perf_counter()
            report = evaluate(p, task, episodes=args.episodes, num_envs=args.num_envs, seed=args.seed)
            rows[name] = {"score": report.normalized_mean, "se": report.normalized_stderr,
                          "success": report.success_rate, "eval_s": time.perf_counter() - t0}
            print(f"{task} | {name}: {report.normalized_mean:.1f} ± {report.normalized_stderr:.1f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        obs = example_observations(diffuser, 1, seed=args.seed)
        lat = plan_latencies(planners, obs, args.latency_rounds)
        for name, p in planners.items():
            b = bench_policy(p, batch=1, calls=300, seed=args.seed)
            ms, unet, drafter = lat[name]
            rows[name].update(act_p50=b.act_p50_ms, act_p99=b.act_p99_ms, plan_p10=float(np.percentile(ms, 10)),
                              plan_p50=float(np.percentile(ms, 50)),
                              plan_p99=float(np.percentile(ms, 99)), unet=unet, drafter=drafter)
        base = rows[next(iter(rows))]
        table = []
        for name, r in rows.items():
            diff = r["score"] - base["score"]
            verdict = "—" if r is base else f"{diff:+.1f} ({'within 1 SE or better' if diff >= -base['se'] else 'below 1 SE'})"
            table.append([task, name, str(args.episodes), f"{r['score']:.1f} ± {r['se']:.1f}", f"{r['unet']:.0f}",
                          f"{r['drafter']:.0f}", f"{r['plan_p10']:.2f}", f"{r['plan_p50']:.2f}", f"{r['plan_p99']:.2f}",
                          f"{r['act_p50']:.3f}", f"{r['act_p99']:.3f}", f"{base['plan_p50'] / r['plan_p50']:.1f}x",
                          verdict])
        all_rows += [stamp() + row for row in table]
        print("\n".join(" | ".join(row) for row in [HEADER[3:]] + table) + "\n", flush=True)

    if all_rows and not args.no_write:
        path = append_rows("trajectory_diffuser_vs_diffuser", DESCRIPTION, HEADER, all_rows)
        print(f"appended to {path}")
    return all_rows


if __name__ == "__main__":
    main()
