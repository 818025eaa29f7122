"""Runtime benchmark: act() latency and decisions/s of every shipped policy, and warm-started
against cold replanning on pointmaze-umaze.

    python benchmarks/runtime.py [--device cpu|cuda] [--batches 1,16,64] [--episodes 100]

Part 1, for each ``checkpoints/*/<kind>/``: ``act`` latency p50/p99 and decisions/s at each batch
size, with the policy's own action queue, plus a replan's latency and network evaluations.

Part 2, the Diffuser on pointmaze-umaze replanning every ``--replan`` steps, in one run on the
same episodes and seeds:
  * cold: every replan from noise with ``--cold-steps`` solver steps (the baseline);
  * warm: every replan from the previous plan shifted and noised to ``--t-warm``, ``--warm-steps``
    solver steps.
Records both scores and the ratio of their replan latencies.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_rows, stamp  # noqa: E402

from diffplan.eval import evaluate  # noqa: E402
from diffplan.policies import load_policy  # noqa: E402
from diffplan.runtime.bench import bench_policy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def latency_table(args) -> list[list[str]]:
    rows = []
    for weights in sorted(ROOT.glob("checkpoints/*/*/model.safetensors")):
        folder = weights.parent
        policy = load_policy(folder, device=args.device)
        for batch in args.batches:
            r = bench_policy(policy, batch=batch, calls=args.calls)
            print(f"{policy.spec.task:18s} {policy.kind:22s} batch {batch:3d}: act p50 {r.act_p50_ms:8.3f} ms "
                  f"p99 {r.act_p99_ms:8.3f} ms  {r.decisions_per_s:9.0f} decisions/s  "
                  f"replan p50 {r.plan_p50_ms:8.3f} ms  {r.net_evals_per_plan:.0f} net evals/plan")
            rows.append(stamp() + [args.device, policy.spec.task, policy.kind, str(batch),
                                   f"{r.act_p50_ms:.3f}", f"{r.act_p99_ms:.3f}", f"{r.decisions_per_s:.0f}",
                                   f"{r.plan_p50_ms:.3f}", f"{r.net_evals_per_plan:.1f}",
                                   f"{r.net_evals_per_decision:.2f}"])
    return rows


def warm_vs_cold(args) -> list[list[str]]:
    folder = ROOT / "checkpoints/pointmaze-umaze/diffuser"
    results = {}
    for mode in ("cold", "warm"):
        policy = load_policy(folder, device=args.device)
        cfg = policy.planner.config
        cfg.n_action_steps = args.replan
        cfg.warm_start = mode == "warm"
        cfg.steps = args.cold_steps
        cfg.t_warm = args.t_warm
        cfg.warm_steps = args.warm_steps
        report = evaluate(policy, "pointmaze-umaze", episodes=args.episodes, num_envs=args.num_envs,
                          seed=args.seed, progress=True)
        bench = bench_policy(policy, batch=1, calls=50, warm_start=mode == "warm")
        # a warm replan's latency: time act() on calls that replan, with the queue in place
        planner = policy.planner
        policy.reset(seed=0)
        obs = _example(policy)
        lat = []
        for _ in range(args.replan * 30):
            policy.act(obs)
            if planner.last_steps:
                lat.append(planner.last_latency_ms)
        lat = sorted(lat[1:])  # the first replan of an episode is always cold
        results[mode] = (report, lat[len(lat) // 2], bench)
        print(f"{mode}: {report.summary()}; replan p50 {lat[len(lat) // 2]:.2f} ms")
    (cold, cold_ms, _), (warm, warm_ms, _) = results["cold"], results["warm"]
    diff = warm.normalized_mean - cold.normalized_mean
    speedup = cold_ms / warm_ms
    print(f"warm - cold score: {diff:+.1f} (cold SE {cold.normalized_stderr:.1f}); replan speed-up {speedup:.1f}x")
    return [stamp() + [args.device, f"every {args.replan}", f"{args.cold_steps} from noise",
                       f"{cold.normalized_mean:.1f} ± {cold.normalized_stderr:.1f}", f"{cold_ms:.2f}",
                       f"{args.warm_steps} from t={args.t_warm}",
                       f"{warm.normalized_mean:.1f} ± {warm.normalized_stderr:.1f}", f"{warm_ms:.2f}",
                       f"{diff:+.1f}", f"{speedup:.1f}x", str(args.episodes)]]


def _example(policy):
    from diffplan.runtime.bench import example_observations

    obs = example_observations(policy, 1)
    return {k: v[0] for k, v in obs.items()} if isinstance(obs, dict) else obs[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--num-envs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replan", type=int, default=32, help="replan every N steps in part 2")
    parser.add_argument("--cold-steps", type=int, default=10)
    parser.add_argument("--warm-steps", type=int, default=2)
    parser.add_argument("--t-warm", type=float, default=0.3)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-warm", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.device == "cpu":
        torch.set_num_threads(1)
    if not args.skip_latency:
        rows = latency_table(args)
        if not args.no_record:
            append_rows("runtime: act latency",
                        "`python benchmarks/runtime.py`: `act` with each policy's own action queue, fixed "
                        "observations from the task's eval env, 200 calls after warm-up; 'replan' forces a "
                        "fresh plan every call. CPU runs use 1 thread.",
                        ["date", "machine", "commit", "device", "task", "policy", "batch", "act p50 ms",
                         "act p99 ms", "decisions/s", "replan p50 ms", "net evals/plan", "net evals/decision"],
                        rows)
    if not args.skip_warm:
        rows = warm_vs_cold(args)
        if not args.no_record:
            append_rows("runtime: warm vs cold replanning",
                        "`python benchmarks/runtime.py`: the Diffuser on pointmaze-umaze replanning every N "
                        "steps with PD tracking, same episodes and seeds; baseline = cold replans from noise. "
                        "Replan latency is the median act() call that replanned, batch 1.",
                        ["date", "machine", "commit", "device", "replan", "cold steps", "cold score",
                         "cold replan ms", "warm steps", "warm score", "warm replan ms", "score diff",
                         "speed-up", "episodes"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
