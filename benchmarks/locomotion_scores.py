"""Locomotion scores: the behavior policies, the datasets made from them, and the policies
trained on those datasets.

Three parts, each optional:

* snapshots (always, seconds): every shipped behavior snapshot's evaluated return and which one
  the recipes pick as medium / expert;
* ``--datasets``: each dataset's size, episode count, mean episode return and D4RL-normalized
  score -- the number D4RL reports for its own datasets (its medium datasets average about
  44 / 40 / 62 for hopper / halfcheetah / walker2d). A dataset already made with
  ``diffplan data make`` is read from the Minari cache; one that is not (or every one, with
  ``--regenerate``) is generated here and timed. ``--versions 0 1`` adds the v1 datasets (issue
  #23) and a table of every dataset's statistics against D4RL's;
* ``--policies``: every shipped checkpoint ``checkpoints/<family>-<kind>/<policy>/`` evaluated on
  its task (``--episodes`` 1000-step episodes, the same seeds for every policy), D4RL-normalized
  score as mean ± standard error, beside BC on the same dataset (BC's checkpoint is evaluated in
  the same run; a task without a shipped BC gets its policies' rows without the ratio).

    python benchmarks/locomotion_scores.py                                   # snapshots only
    python benchmarks/locomotion_scores.py --datasets --families hopper      # cached or made
    python benchmarks/locomotion_scores.py --datasets --steps 100000 --no-record  # quick, scaled
    python benchmarks/locomotion_scores.py --datasets --versions 0 1         # v0 and v1 vs D4RL
    python benchmarks/locomotion_scores.py --policies --episodes 10          # shipped checkpoints
    python benchmarks/locomotion_scores.py --policies --families hopper --kinds medium-expert

Writes ``outputs/benchmarks/locomotion_scores.json``, prints Markdown tables, and appends the
dataset and policy rows to ``benchmarks/RESULTS.md`` (sections ``locomotion_datasets`` and
``locomotion_scores``) unless ``--no-record`` (rows of scaled-down datasets are never recorded).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_rows, stamp, training_facts  # noqa: E402

from diffplan.envs import locomotion as L  # noqa: E402
from diffplan.envs.behavior import D4RL_REF, d4rl_normalized  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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


def _cached(task: str):
    """The made dataset of ``task`` (an OfflineDataset), or None when it is not made."""
    from diffplan.envs import get_task

    card = get_task(task)
    return card.load_dataset(progress=False) if card.dataset_is_made() else None


def dataset_rows(steps: int | None, num_envs: int, families, kinds,
                 regenerate: bool = False, versions=(0,)) -> list[dict]:
    from diffplan.envs import list_tasks

    rows = []
    for fam in families:
        if not L.list_snapshots(fam):
            print(f"# {fam}: no shipped snapshots, skipped")
            continue
        env_id = L.FAMILIES[fam]
        for version in versions:
            for kind in kinds:
                task = L.task_name(fam, kind, version)
                if task not in list_tasks():
                    print(f"# {task}: no card (its behaviors are not shipped), skipped")
                    continue
                rows.append(_dataset_row(task, fam, kind, version, env_id, steps, num_envs, regenerate))
    return rows


def _dataset_row(task, fam, kind, version, env_id, steps, num_envs, regenerate) -> dict:
    d = None if (regenerate or steps) else _cached(task)
    source, dt, segments = "cache", None, None
    if d is None:
        t0 = time.time()
        d = L.make_dataset(fam, kind, steps=steps, num_envs=num_envs, progress=True, version=version)
        dt, source = time.time() - t0, "generated"
        segments = [{"behavior": s.label, "steps": s.steps, "seed": s.seed}
                    for s in L.recipe(fam, kind, steps, version=version)]
    rets = d.episode_returns()
    stats = L.dataset_stats(d)
    d4rl_steps, d4rl_mean = L.D4RL_DATASETS[fam][kind]
    return {"task": task, "version": version, "stats": stats, "d4rl_steps": d4rl_steps, "d4rl_mean": d4rl_mean,
            "mean_within_25pct": None if d4rl_mean is None else abs(stats["mean"] - d4rl_mean) <= 0.25 * d4rl_mean,
            "size_in_range": (150_000 <= stats["steps"] <= 500_000) if kind == "medium-replay" else None,
            "steps": len(d), "episodes": int(len(rets)),
            "return_mean": float(rets.mean()), "d4rl_score": d4rl_normalized(env_id, float(rets.mean())),
            "terminals": int(d.terminals.sum()), "timeouts": int(d.timeouts.sum()),
            "source": source, "gen_s": None if dt is None else round(dt, 1),
            "steps_per_s": None if dt is None else round(len(d) / dt), "segments": segments}


# --------------------------------------------------------------------------------------------
# Shipped policies
# --------------------------------------------------------------------------------------------


def shipped_checkpoints(families, kinds_filter: set[str] | None = None,
                        dataset_kinds=L.KINDS, versions=(0,)) -> list[Path]:
    """``checkpoints/<family>-<kind>[-v1]/<policy>/`` folders with weights, BC first per task."""
    out = []
    for fam in families:
        for task_dir in sorted(ROOT.glob(f"checkpoints/{fam}-*")):
            if task_dir.name not in {L.task_name(fam, k, v) for k in dataset_kinds for v in versions}:
                continue
            folders = sorted(p.parent for p in task_dir.glob("*/model.safetensors"))
            folders.sort(key=lambda p: (p.name != "bc", p.name))
            out += [f for f in folders if not kinds_filter or f.name in kinds_filter
                    or f.name == "bc"]
    return out


def policy_rows(folders: list[Path], episodes: int, num_envs: int, seed: int,
                write_metrics: bool = False) -> list[dict]:
    import torch

    from diffplan.eval import evaluate
    from diffplan.policies import load_policy

    torch.set_num_threads(1)
    rows, bc = [], {}
    for folder in folders:
        policy = load_policy(folder)
        task = policy.spec.task
        report = evaluate(policy, task, episodes=episodes, num_envs=num_envs, seed=seed,
                          progress=True)
        print(report.summary(), flush=True)
        if write_metrics:  # what `diffplan eval` writes beside the weights
            if not report.write_metrics(folder, keep_larger=True):  # e.g. BC's 50 episodes beside a 20-episode run
                print(f"{folder}/metrics.json kept: it comes from more episodes", flush=True)
        row = {"task": task, "policy": policy.kind, "checkpoint": str(folder.relative_to(ROOT)),
               "episodes": report.episodes, "score": report.normalized_mean,
               "score_se": report.normalized_stderr, "return_mean": report.return_mean,
               "length_mean": float(np.mean(report.lengths)),
               "act_p50_ms": report.latency_p50_ms, "eval_wall_s": round(report.wall_s),
               "params_m": sum(p.numel() for p in policy.parameters()) / 1e6,
               "size_mb": sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20,
               **training_facts(folder)}
        if policy.kind == "bc":
            bc[task] = row
        base = bc.get(task)
        if base is not None:
            row["bc_score"], row["bc_score_se"] = base["score"], base["score_se"]
            row["vs_bc"] = row["score"] / base["score"] if base["score"] else None
        rows.append(row)
    return rows


def _md(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.1f}" if isinstance(v, float) else "" if v is None else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _record_datasets(rows: list[dict]) -> None:
    out = []
    for r in rows:
        gen = "cache" if r["gen_s"] is None else f"{r['gen_s']:.0f} s ({r['steps_per_s']} steps/s)"
        out.append(stamp() + [r["task"], f"{r['steps']:,}", str(r["episodes"]),
                              str(r["terminals"]), str(r["timeouts"]), f"{r['return_mean']:.1f}",
                              f"{r['d4rl_score']:.1f}", gen])
    append_rows(
        "locomotion_datasets",
        "`python benchmarks/locomotion_scores.py --datasets`: the locomotion datasets made here "
        "from the shipped SAC behavior snapshots (envs/locomotion.py recipes). Mean episode "
        "return and its D4RL-normalized score, the number D4RL reports for its own datasets "
        "(D4RL's medium datasets: about 44 / 40 / 62 for hopper / halfcheetah / walker2d; "
        "medium-replay and medium-expert follow from the behavior snapshots, so they differ "
        "from D4RL's). "
        "'generation' is the time to make it in this run, 'cache' when read from the Minari "
        "cache (see `diffplan data make`).",
        ["date", "machine", "commit", "dataset", "steps", "episodes", "terminals", "timeouts",
         "mean return", "D4RL-normalized", "generation"], out)


def _record_versions(rows: list[dict]) -> None:
    def yes(v):
        return "-" if v is None else ("yes" if v else "no")

    out = []
    for r in rows:
        st = r["stats"]
        out.append(stamp() + [r["task"], f"v{r['version']}", f"{st['steps']:,}", str(st["episodes"]),
                              f"{st['mean']:.1f} / {st['min']:.1f} / {st['max']:.1f}",
                              f"{r['d4rl_steps']:,}", "-" if r["d4rl_mean"] is None else f"{r['d4rl_mean']:g}",
                              yes(r["mean_within_25pct"]), yes(r["size_in_range"])])
    append_rows(
        "locomotion datasets against D4RL",
        "`python benchmarks/locomotion_scores.py --datasets --versions 0 1` (issue #23): each made "
        "locomotion dataset's env steps, complete episodes and mean / min / max D4RL-normalized "
        "episode return, beside D4RL's (steps, mean: `L.D4RL_DATASETS`; '-' where not recorded here). "
        "Targets: mean within 25% of D4RL's; medium-replay 0.15M-0.5M steps.",
        ["date", "machine", "commit", "dataset", "version", "steps", "episodes",
         "normalized mean / min / max", "D4RL steps", "D4RL mean", "mean within 25%",
         "replay size in range"], out)


def _record_policies(rows: list[dict]) -> None:
    out = []
    for r in rows:
        bc = (f"{r['bc_score']:.1f} ± {r['bc_score_se']:.1f}" if "bc_score" in r else "-")
        ratio = f"{r['vs_bc']:.2f}" if r.get("vs_bc") is not None else "-"
        wall = r.get("wall", "?")
        out.append(stamp() + [r["task"], r["policy"], str(r["episodes"]),
                              f"{r['score']:.1f} ± {r['score_se']:.1f}", bc, ratio,
                              f"{r['length_mean']:.0f}", f"{r['act_p50_ms']:.0f}",
                              str(r.get("steps", "?")), wall,
                              f"{r['params_m']:.2f}M / {r['size_mb']:.1f} MB"])
    append_rows(
        "locomotion_scores",
        "`python benchmarks/locomotion_scores.py --policies`: shipped locomotion checkpoints on "
        "their task (1000-step episodes, reset seeds 0..N-1, the same for every policy), "
        "D4RL-normalized score (mean ± standard error over episodes) beside BC trained on the "
        "same dataset and evaluated in the same run; 'vs BC' is the ratio of the means. act p50 "
        "is one call for 10 envs at once, one thread.",
        ["date", "machine", "commit", "task", "policy", "episodes", "D4RL-normalized score",
         "BC (same run)", "vs BC", "mean ep. length", "act p50 ms (10 envs)", "train steps",
         "train wall", "params / size"], out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", action="store_true", help="dataset statistics (cache or make)")
    p.add_argument("--regenerate", action="store_true", help="generate datasets even if cached")
    p.add_argument("--steps", type=int, default=None, help="scale each dataset to this many steps")
    p.add_argument("--num-envs", type=int, default=L.DEFAULT_NUM_ENVS)
    p.add_argument("--families", nargs="*", default=list(L.FAMILIES))
    p.add_argument("--kinds", nargs="*", default=list(L.KINDS))
    p.add_argument("--versions", nargs="*", type=int, default=[0],
                   help="dataset versions (0: the shipped policies' data, 1: issue #23's)")
    p.add_argument("--policies", action="store_true", help="evaluate the shipped checkpoints")
    p.add_argument("--policy-kinds", default="", help="comma-separated policy kinds (BC always)")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--eval-envs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-metrics", action="store_true",
                   help="also write each evaluation to its checkpoint's metrics.json")
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--out", default="outputs/benchmarks/locomotion_scores.json")
    a = p.parse_args(argv)
    if a.episodes < 2:
        p.error("--episodes must be >= 2 (a standard error needs two episodes)")
    result = {"d4rl_ref": D4RL_REF, "random_return_v5": L.RANDOM_RETURN_V5,
              "medium_target": L.MEDIUM_TARGET, "snapshots": snapshot_rows()}
    print(_md(result["snapshots"], ["family", "snapshot", "eval_return", "d4rl_score", "role"]))
    if a.datasets:
        rows = dataset_rows(a.steps, a.num_envs, a.families, a.kinds, a.regenerate, a.versions)
        result["datasets"] = rows
        print()
        print(_md([{**r, **{f"norm_{k}": v for k, v in r["stats"].items()}} for r in rows],
                  ["task", "steps", "episodes", "norm_mean", "norm_min", "norm_max", "d4rl_steps",
                   "d4rl_mean", "mean_within_25pct", "size_in_range", "source", "gen_s"]))
        if rows and not a.no_record and not a.steps:
            _record_datasets(rows)
            _record_versions(rows)
    if a.policies:
        kinds = set(filter(None, a.policy_kinds.split(","))) or None
        folders = shipped_checkpoints(a.families, kinds, a.kinds, a.versions)
        rows = policy_rows(folders, a.episodes, a.eval_envs, a.seed, a.write_metrics)
        result["policies"] = rows
        print()
        print(_md(rows, ["task", "policy", "episodes", "score", "score_se", "bc_score", "vs_bc",
                         "length_mean", "act_p50_ms", "eval_wall_s"]))
        if rows and not a.no_record:
            _record_policies(rows)
        if not rows:
            print("no shipped locomotion checkpoints under checkpoints/<family>-*/")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
