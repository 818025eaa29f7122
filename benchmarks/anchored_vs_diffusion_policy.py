"""Anchored action diffusion vs Diffusion Policy (DDIM 10) vs BC on a maze, same seeds and episodes.

For each policy: the normalized score over ``--episodes`` evaluation episodes (same seeds for all),
``act`` decisions per second at batch 1 and over a 64-env vector env (time inside ``act`` only,
the envs really stepping), and network evaluations per decision (forward calls of ``policy.net``,
counted by hooks; for the anchored policy one call is one pass of the whole 2-stage cascade).
Prints a table and appends its rows (date, machine, commit) to the section
"anchored_vs_diffusion_policy" of ``benchmarks/RESULTS.md`` (``benchmarks/results.py``).
``--anchored-queues 2,8`` also runs the anchored checkpoint with those action-queue lengths.

    python benchmarks/anchored_vs_diffusion_policy.py \
        --anchored checkpoints/pointmaze-umaze/anchored \
        --diffusion-policy checkpoints/pointmaze-umaze/diffusion_policy \
        --bc checkpoints/pointmaze-umaze/bc
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from results import append_rows, stamp


def count_net_calls(policy):
    """A counter of forward calls of ``policy.net``, and a function removing the hook."""
    calls = [0]
    handle = policy.net.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls, handle.remove


def decisions_per_s(policy, task: str, num_envs: int, decisions: int, seed: int = 0) -> dict:
    """Drive ``num_envs`` real envs; time only ``act``. Returns decisions/s, p50 latency, evals."""
    from diffplan.envs import get_task

    card = get_task(task)
    envs = gym.vector.SyncVectorEnv([lambda: card.make_env() for _ in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs, _ = envs.reset(seed=[seed + i for i in range(num_envs)])
    if num_envs == 1:
        obs = {k: v[0] for k, v in obs.items()} if isinstance(obs, dict) else obs[0]
    policy.reset(seed=seed)
    for _ in range(16):  # warm-up: allocator, caches
        policy.act(obs)
    policy.reset(seed=seed)
    calls, remove = count_net_calls(policy)
    lat, cpu, replanned, n_calls = [], [], [], max(decisions // num_envs, 64)
    try:
        for _ in range(n_calls):
            c0, t0 = time.thread_time(), time.perf_counter()
            action = policy.act(obs)
            lat.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
            replanned.append(policy.planner.last_steps > 0)
            obs, _, term, trunc, _ = envs.step(action if num_envs > 1 else action[None])
            done = np.asarray(term) | np.asarray(trunc)
            if num_envs == 1:
                obs = {k: v[0] for k, v in obs.items()} if isinstance(obs, dict) else obs[0]
                if done[0]:
                    policy.reset()
            elif done.any():
                policy.reset(mask=done)
    finally:
        remove()
        envs.close()
    lat, replanned = np.asarray(lat), np.asarray(replanned)
    # Robust to the VM's stalls: the median latency of replanning calls and of queue calls,
    # weighted by how often each kind occurred.
    robust = sum(m.mean() * np.median(lat[m]) for m in (replanned, ~replanned) if m.any())
    # CPU time of this thread inside `act`: what the decisions cost, without the time other
    # processes held the core (1 torch thread, so the thread does all the work).
    return {"decisions_per_s": num_envs * len(lat) / lat.sum(), "decisions_per_s_median": num_envs / robust,
            "decisions_per_cpu_s": num_envs * len(lat) / max(sum(cpu), 1e-9),
            "act_p50_ms": 1e3 * float(np.median(lat)), "replan_p50_ms": 1e3 * float(np.median(lat[replanned])),
            "net_evals_per_decision": calls[0] / len(lat)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ck = ROOT / "checkpoints" / "pointmaze-umaze"
    ap.add_argument("--task", default="pointmaze-umaze")
    ap.add_argument("--anchored", default=str(ck / "anchored"))
    ap.add_argument("--diffusion-policy", default=str(ck / "diffusion_policy"))
    ap.add_argument("--bc", default=str(ck / "bc"))
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--num-envs", type=int, default=25, help="parallel envs of the score evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decisions", type=int, default=2000, help="decisions timed per speed setting")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--anchored-queues", default="",
                    help="comma-separated extra action-queue lengths (n_action_steps) to measure the anchored "
                         "checkpoint with, e.g. 2,8 (its own setting is always measured)")
    ap.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--write-metrics", action="store_true",
                    help="also write each evaluation as metrics.json into its checkpoint folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffplan.eval import evaluate
    from diffplan.policies import load_policy

    runs = [("anchored (2 steps)", args.anchored, None), ("DiffusionPolicy (DDIM 10)", args.diffusion_policy, None),
            ("BC", args.bc, None)]
    runs[1:1] = [("anchored (2 steps)", args.anchored, int(q)) for q in args.anchored_queues.split(",") if q.strip()]
    rows = []
    for name, path, queue in runs:
        if not Path(path).exists():
            print(f"skip {name}: no checkpoint at {path}")
            continue
        policy = load_policy(path, task=args.task)
        if queue is not None:
            if queue == policy.planner.config.n_action_steps:
                continue
            policy.planner.config.n_action_steps = queue
            name = f"{name}, queue {queue}"
        report = evaluate(policy, args.task, episodes=args.episodes, num_envs=args.num_envs, seed=args.seed)
        print(report.summary(), flush=True)
        if args.write_metrics and queue is None:
            folder = getattr(policy, "checkpoint_path", Path(path))
            report.write_metrics(folder)
        b1 = decisions_per_s(policy, args.task, 1, args.decisions, args.seed)
        b64 = decisions_per_s(policy, args.task, 64, 64 * max(args.decisions // 64, 64), args.seed)
        shown = Path(path).resolve()
        shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
        rows.append({"policy": name, "path": str(shown), "score": report.normalized_mean,
                     "stderr": report.normalized_stderr, "success": report.success_rate,
                     "b1": b1["decisions_per_s"], "b1_med": b1["decisions_per_s_median"],
                     "b1_replan_ms": b1["replan_p50_ms"], "b64": b64["decisions_per_s"],
                     "b64_med": b64["decisions_per_s_median"],
                     "b1_cpu": b1["decisions_per_cpu_s"], "b64_cpu": b64["decisions_per_cpu_s"],
                     "evals": b1["net_evals_per_decision"],
                     "n_action_steps": policy.planner.config.n_action_steps})
        print(f"  batch 1: {b1['decisions_per_s']:.0f} decisions/s ({b1['decisions_per_s_median']:.0f} from medians; "
              f"replan p50 {b1['replan_p50_ms']:.2f} ms), batch 64: {b64['decisions_per_s']:.0f} decisions/s "
              f"({b64['decisions_per_s_median']:.0f} from medians); per CPU-second {b1['decisions_per_cpu_s']:.0f} / "
              f"{b64['decisions_per_cpu_s']:.0f}, "
              f"{b1['net_evals_per_decision']:.3f} network evaluations/decision", flush=True)

    dp = next((r for r in rows if r["policy"].startswith("DiffusionPolicy")), None)
    an = next((r for r in rows if r["policy"] == "anchored (2 steps)"), None)
    bc = next((r for r in rows if r["policy"] == "BC"), None)
    header = ["date", "machine", "commit", "task", "policy", "episodes", "normalized score", "success",
              "decisions/s, batch 1 (mean / from medians)", "replan p50 ms, batch 1",
              "decisions/s, 64 envs (mean / from medians)", "decisions per CPU-second (batch 1 / 64 envs)",
              "x DiffusionPolicy decisions/s, mean (batch 1 / 64 envs)",
              "x DiffusionPolicy, from medians (batch 1 / 64 envs)", "x DiffusionPolicy, CPU time (batch 1 / 64 envs)",
              "net evals / decision", "actions per plan"]
    table = []
    for r in rows:

        def ratio(k1, k64, r=r):
            return f"{r[k1] / dp[k1]:.1f}x / {r[k64] / dp[k64]:.1f}x" if dp else "—"

        table.append([*stamp(), args.task, r["policy"], str(args.episodes), f"{r['score']:.1f} ± {r['stderr']:.1f}",
                      f"{100 * r['success']:.0f}%", f"{r['b1']:.0f} / {r['b1_med']:.0f}", f"{r['b1_replan_ms']:.2f}",
                      f"{r['b64']:.0f} / {r['b64_med']:.0f}", f"{r['b1_cpu']:.0f} / {r['b64_cpu']:.0f}",
                      ratio("b1", "b64"), ratio("b1_med", "b64_med"), ratio("b1_cpu", "b64_cpu"),
                      f"{r['evals']:.3f}", str(r["n_action_steps"])])
    notes = []
    if dp and an:
        notes.append(f"anchored / DiffusionPolicy decisions/s: {an['b1'] / dp['b1']:.1f}x at batch 1 "
                     f"({an['b1_med'] / dp['b1_med']:.1f}x from medians), {an['b64'] / dp['b64']:.1f}x at 64 envs "
                     f"({an['b64_med'] / dp['b64_med']:.1f}x from medians); by CPU time {an['b1_cpu'] / dp['b1_cpu']:.1f}x "
                     f"and {an['b64_cpu'] / dp['b64_cpu']:.1f}x; score {an['score']:.1f} vs {dp['score']:.1f}.")
    for other in (dp, bc):
        if an and other:
            diff, se = an["score"] - other["score"], float(np.hypot(an["stderr"], other["stderr"]))
            verdict = "above" if diff > 2 * se else "below" if diff < -2 * se else "within 2 combined SE of"
            notes.append(f"anchored vs {other['policy']}: {diff:+.1f} (combined SE {se:.1f}): {verdict} it.")
    print("\n".join("| " + " | ".join(r) + " |" for r in table))
    print("\n".join(notes))
    if not args.no_record:
        description = (
            "`python benchmarks/anchored_vs_diffusion_policy.py`: anchored action diffusion, Diffusion Policy "
            "(DDIM 10) and BC checkpoints in one run, on the same eval episodes (env seeds `seed..seed+episodes-1`, "
            "25 parallel envs). Speed: time inside `act` only while the envs really step, ~2000 decisions at "
            "batch 1 and 64 x 64 over a 64-env vector env, 1 torch thread; 'from medians' weights the median "
            "latency of replanning and of queue calls by their frequency (robust to stalls of the shared VM); "
            "'per CPU-second' divides by the thread CPU time spent inside `act` (what a decision costs, without "
            "the time other processes held the core). "
            "'queue N' rows are the anchored checkpoint run with N actions per plan instead of its own.")
        append_rows("anchored_vs_diffusion_policy", description, header, table)
    return rows


    return rows


if __name__ == "__main__":
    main()
