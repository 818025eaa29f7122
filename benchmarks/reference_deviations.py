"""A/B of the inference settings where diffplan deviates from the reference code (issue 18), on
tuning seeds (reset seeds 1000+), with BC in the same run.

* ``--diffuser TASK``: the shipped value-guided Diffuser as shipped (constant guidance step) and
  with ``guide_variance`` (the reference's posterior-variance factor) at each ``--scales`` value;
* ``--anchored TASK [TASK ...]``: the shipped anchored policy at each ``--t-starts`` fraction of
  its truncation level, and warm-started (``runtime.warm_start``) at each ``--t-warms`` fraction;
  with ``--critic CKPT`` (a ``kind: critic`` checkpoint, e.g. ``configs/critic/hopper-medium.yaml``
  trained), also reranked by Q(s, first action) instead of its classifier (``critic:``);
* ``--rerank TASK`` with ``--critic CKPT``: reranking A/B of the Trajectory Diffuser (as shipped;
  its draft refined once from noise, the control; and ``--candidates`` noised refinements picked by
  Q) and of the Diffuser (as shipped at temperature 0; temperature 1 with 8 candidates picked by V,
  the reference's selection; and the same candidates picked by Q).

Each setting is a dotted override of the loaded policy's config (nothing is written into the
checkpoints). One JSON row per setting goes to ``outputs/benchmarks/reference_deviations.json``
as it finishes; the table is appended to ``benchmarks/RESULTS.md`` (section
``reference_deviations``) unless ``--no-record``. ``--record-json FILE`` records rows measured
earlier by this script instead of measuring.

    OMP_NUM_THREADS=1 python benchmarks/reference_deviations.py --diffuser hopper-medium --scales 1 10 30
    OMP_NUM_THREADS=1 python benchmarks/reference_deviations.py --anchored hopper-medium halfcheetah-medium
    OMP_NUM_THREADS=1 python benchmarks/reference_deviations.py --anchored hopper-medium --t-starts \
        --warm-t-starts --critic runs/critic-hopper-medium
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_rows, stamp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "benchmarks" / "reference_deviations.json"
HEADER = ["date", "machine", "commit", "task", "policy", "setting", "episodes", "score", "mean length",
          "act p50 ms"]


def measure(task: str, kind: str, setting: str, overrides: dict, episodes: int, seed: int) -> dict:
    import torch

    from diffplan.eval import evaluate
    from diffplan.policies import load_policy

    torch.set_num_threads(1)
    policy = load_policy(ROOT / "checkpoints" / task / kind)
    for key, value in overrides.items():
        *path, name = key.split(".")
        target = policy.config
        for part in path:
            target = getattr(target, part)
        setattr(target, name, value)
    t0 = time.time()
    d = evaluate(policy, episodes=episodes, num_envs=min(10, episodes), seed=seed, record=0).to_dict()
    return {"task": task, "policy": kind, "setting": setting, "episodes": episodes, "seed": seed,
            "score_mean": d["normalized_mean"], "score_se": d["normalized_stderr"],
            "mean_len": sum(d["lengths"]) / len(d["lengths"]), "p50_ms": d["latency_p50_ms"],
            "wall_s": round(time.time() - t0, 1)}


def settings(args) -> list[tuple[str, str, str, dict]]:
    out = []
    if args.diffuser:
        out.append((args.diffuser, "bc", "BC", {}))
        out.append((args.diffuser, "diffuser", "shipped (constant guidance step)", {}))
        out += [(args.diffuser, "diffuser", f"guide_variance, guide_scale {s:g}",
                 {"guide_variance": True, "guide_scale": s}) for s in args.scales]
    for task in args.anchored or ():
        out.append((task, "bc", "BC", {}))
        out.append((task, "anchored", "shipped config", {}))
        out += [(task, "anchored", f"t_start {f:g}", {"t_start": f}) for f in args.t_starts]
        out += [(task, "anchored", f"warm start, t_start {f:g}, t_warm {w:g}",
                 {"t_start": f, "t_warm": w, "runtime.warm_start": True})
                for f in args.warm_t_starts for w in args.t_warms]
        if args.critic:
            out.append((task, "anchored", f"critic rerank ({args.critic.name})", {"critic": str(args.critic.resolve())}))
    if args.rerank:
        if not args.critic:
            raise SystemExit("--rerank needs --critic CKPT")
        task, critic = args.rerank, str(args.critic.resolve())
        out.append((task, "bc", "BC", {}))
        out.append((task, "trajectory_diffuser", "shipped (one plan)", {}))
        out.append((task, "trajectory_diffuser", "one plan, noised draft (the control)", {"noise_draft": True}))
        out += [(task, "trajectory_diffuser", f"{k} noised refinements, critic rerank",
                 {"n_candidates": k, "critic": critic}) for k in args.candidates]
        out.append((task, "diffuser", "shipped (temperature 0, one plan)", {}))
        out.append((task, "diffuser", "temperature 1, 8 candidates by V", {"temperature": 1.0, "n_samples": 8}))
        out.append((task, "diffuser", "temperature 1, 8 candidates, critic rerank",
                    {"temperature": 1.0, "n_samples": 8, "critic": critic}))
    return out


def table_row(r: dict) -> list[str]:
    return [r["task"], r["policy"], r["setting"], str(r["episodes"]),
            f"{r['score_mean']:.1f} ± {r['score_se']:.1f}", f"{r['mean_len']:.0f}", f"{r['p50_ms']:.2f}"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--diffuser", metavar="TASK")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0, 30.0, 100.0])
    p.add_argument("--anchored", metavar="TASK", nargs="+")
    p.add_argument("--t-starts", type=float, nargs="*", default=[0.5, 0.3, 0.16, 0.08])
    p.add_argument("--warm-t-starts", type=float, nargs="*", default=[1.0, 0.16])
    p.add_argument("--t-warms", type=float, nargs="+", default=[0.5])
    p.add_argument("--critic", type=Path, help="anchored: also rerank by this critic checkpoint's Q")
    p.add_argument("--rerank", metavar="TASK", help="TD and Diffuser reranking A/B (needs --critic)")
    p.add_argument("--candidates", type=int, nargs="+", default=[8, 32])
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=1000, help="first tuning seed (default 1000)")
    p.add_argument("--record-json", type=Path, help="record the rows of an earlier run instead of measuring")
    p.add_argument("--note", help="a paragraph recorded under the rows")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    if args.record_json:
        rows = json.loads(args.record_json.read_text())
    else:
        rows = []
        OUT.parent.mkdir(parents=True, exist_ok=True)
        for task, kind, setting, overrides in settings(args):
            rows.append(measure(task, kind, setting, overrides, args.episodes, args.seed))
            print(json.dumps(rows[-1]), flush=True)
            OUT.write_text(json.dumps(rows, indent=1) + "\n")
    print("| " + " | ".join(HEADER[3:]) + " |")
    for r in rows:
        print("| " + " | ".join(table_row(r)) + " |")
    if not args.no_record:
        append_rows("reference_deviations",
                    "Issue 18: inference settings where diffplan deviates from the reference code, A/B on "
                    "tuning seeds (1000+) with BC in the same run (`benchmarks/reference_deviations.py`). "
                    "Score: D4RL-normalized, mean ± standard error.",
                    HEADER, [stamp() + table_row(r) for r in rows], note=args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
