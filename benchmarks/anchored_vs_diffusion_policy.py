"""Anchored action diffusion vs Diffusion Policy (DDIM 10) vs BC on a maze, same seeds and episodes.

For each policy: the normalized score over ``--episodes`` evaluation episodes (same seeds for all),
``act`` decisions per second at batch 1 and over a 64-env vector env (time inside ``act`` only,
the envs really stepping), and network evaluations per decision (forward calls of ``policy.net``,
counted by hooks; for the anchored policy one call is one pass of the whole 2-stage cascade).
Prints a table and appends a dated section to ``benchmarks/RESULTS.md``.

    python benchmarks/anchored_vs_diffusion_policy.py \
        --anchored checkpoints/pointmaze-umaze/anchored \
        --diffusion-policy checkpoints/pointmaze-umaze/diffusion_policy \
        --bc checkpoints/pointmaze-umaze/bc
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


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
    lat, replanned, n_calls = [], [], max(decisions // num_envs, 64)
    try:
        for _ in range(n_calls):
            t0 = time.perf_counter()
            action = policy.act(obs)
            lat.append(time.perf_counter() - t0)
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
    return {"decisions_per_s": num_envs * len(lat) / lat.sum(), "decisions_per_s_median": num_envs / robust,
            "act_p50_ms": 1e3 * float(np.median(lat)), "replan_p50_ms": 1e3 * float(np.median(lat[replanned])),
            "net_evals_per_decision": calls[0] / len(lat)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
    ap.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--write-metrics", action="store_true",
                    help="also write each evaluation as metrics.json into its checkpoint folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffplan.eval import evaluate
    from diffplan.policies import load_policy

    rows = []
    for name, path in (("anchored (2 steps)", args.anchored), ("DiffusionPolicy (DDIM 10)", args.diffusion_policy),
                       ("BC", args.bc)):
        if not Path(path).exists():
            print(f"skip {name}: no checkpoint at {path}")
            continue
        policy = load_policy(path, task=args.task)
        report = evaluate(policy, args.task, episodes=args.episodes, num_envs=args.num_envs, seed=args.seed)
        print(report.summary(), flush=True)
        if args.write_metrics:
            folder = getattr(policy, "checkpoint_path", Path(path))
            (Path(folder) / "metrics.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        b1 = decisions_per_s(policy, args.task, 1, args.decisions, args.seed)
        b64 = decisions_per_s(policy, args.task, 64, 64 * max(args.decisions // 64, 64), args.seed)
        shown = Path(path).resolve()
        shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
        rows.append({"policy": name, "path": str(shown), "score": report.normalized_mean,
                     "stderr": report.normalized_stderr, "success": report.success_rate,
                     "b1": b1["decisions_per_s"], "b1_med": b1["decisions_per_s_median"],
                     "b1_replan_ms": b1["replan_p50_ms"], "b64": b64["decisions_per_s"],
                     "b64_med": b64["decisions_per_s_median"],
                     "evals": b1["net_evals_per_decision"],
                     "n_action_steps": policy.planner.config.n_action_steps})
        print(f"  batch 1: {b1['decisions_per_s']:.0f} decisions/s ({b1['decisions_per_s_median']:.0f} from medians; "
              f"replan p50 {b1['replan_p50_ms']:.2f} ms), batch 64: {b64['decisions_per_s']:.0f} decisions/s "
              f"({b64['decisions_per_s_median']:.0f} from medians), "
              f"{b1['net_evals_per_decision']:.3f} network evaluations/decision", flush=True)

    head = ("| policy | normalized score | decisions/s, batch 1 (mean / from medians) | replan p50 ms, batch 1 "
            "| decisions/s, 64 envs (mean / from medians) | net evals / decision | actions per plan |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['score']:.1f} ± {r['stderr']:.1f} | {r['b1']:.0f} / {r['b1_med']:.0f} | "
                     f"{r['b1_replan_ms']:.2f} | {r['b64']:.0f} / {r['b64_med']:.0f} | {r['evals']:.3f} | "
                     f"{r['n_action_steps']} |")
    dp = next((r for r in rows if r["policy"].startswith("DiffusionPolicy")), None)
    an = next((r for r in rows if r["policy"].startswith("anchored")), None)
    notes = []
    if dp and an:
        notes.append(f"anchored / DiffusionPolicy decisions/s: {an['b1'] / dp['b1']:.1f}x at batch 1 "
                     f"({an['b1_med'] / dp['b1_med']:.1f}x from medians), {an['b64'] / dp['b64']:.1f}x at 64 envs "
                     f"({an['b64_med'] / dp['b64_med']:.1f}x from medians); score {an['score']:.1f} vs {dp['score']:.1f}.")
    table = "\n".join(lines + ([""] + notes if notes else []))
    print("\n" + table)
    if not args.no_record:
        section = (f"\n## Anchored action diffusion vs Diffusion Policy vs BC ({args.task})\n\n"
                   f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
                   f"- machine: {machine()}\n- git commit: {git_commit()}\n"
                   f"- episodes: {args.episodes} per policy, seeds {args.seed}..{args.seed + args.episodes - 1}, "
                   f"{args.num_envs} parallel envs; speed: time inside `act` only, envs stepping, "
                   f"~{args.decisions} decisions at batch 1\n"
                   + "".join(f"- {r['policy']}: `{r['path']}`\n" for r in rows) + "\n" + table + "\n")
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(section)
    return rows


if __name__ == "__main__":
    main()
