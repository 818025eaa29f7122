"""Per-checkpoint solver-step search: the fewest steps that score as well as the best.

A diffusion planner's step count trades score for latency, and where the trade turns depends on
the checkpoint (its noise schedule, its objective, how far it trained): the seed paper's step
search (AutoDiffusion / S^3) made per checkpoint. ``tune_steps`` evaluates a policy at each step
count on tuning seeds (1000 and up: reported scores use seeds from 0), times a forced replan at
batch 1, and picks the fewest steps whose mean score is within one standard error of the best
mean. ``write_default_steps`` stores that count in the checkpoint's ``config.yaml``, where
``PolicyBase.default_steps`` reads it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from diffplan.atomic import write_file
from diffplan.config import ConfigError

DEFAULT_STEPS = (1, 2, 3, 5, 10)
TUNING_SEED = 1000


@dataclass
class StepRow:
    steps: int
    score_mean: float  # normalized score on the tuning seeds
    score_stderr: float
    plan_p50_ms: float  # a forced replan at batch 1
    plan_p10_ms: float


def tune_steps(policy, task=None, steps=DEFAULT_STEPS, episodes: int = 50, num_envs: int = 10,
               seed: int = TUNING_SEED, plan_calls: int = 20, progress: bool = False):
    """Score and time ``policy`` at each count in ``steps``; returns ``(rows, chosen)``.

    ``chosen`` is the fewest steps whose mean is at least the best mean minus the best row's
    standard error. The policy's own settings are restored afterwards."""
    from diffplan.eval.evaluate import evaluate
    from diffplan.runtime.bench import bench_policy

    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < policy.min_steps:
        raise ConfigError(f"{policy.kind} step counts must be integers >= {policy.min_steps}, got {steps}")
    if episodes < 2:
        raise ConfigError(f"episodes must be >= 2 to give a standard error, got {episodes}")
    task = task or policy.spec.task
    planner_cfg = policy.planner.config
    saved = planner_cfg.steps
    rows = []
    try:
        for k in steps:
            planner_cfg.steps = k
            report = evaluate(policy, task, episodes=episodes, num_envs=num_envs, seed=seed, record=0)
            bench = bench_policy(policy, batch=1, calls=plan_calls * 10, steps=k, seed=seed)
            rows.append(StepRow(k, report.normalized_mean, report.normalized_stderr, bench.plan_p50_ms,
                                bench.plan_p10_ms))
            if progress:
                print(format_rows(rows[-1:], header=len(rows) == 1), flush=True)
    finally:
        planner_cfg.steps = saved
    return rows, choose_steps(rows)


def choose_steps(rows: list[StepRow]) -> int:
    """The fewest steps whose mean score is within one standard error of the best mean."""
    best = max(rows, key=lambda r: r.score_mean)
    return min(r.steps for r in rows if r.score_mean >= best.score_mean - best.score_stderr)


def write_default_steps(checkpoint, steps: int, rows: list[StepRow] | None = None) -> Path:
    """Set the cold-plan step count in ``checkpoint``'s ``config.yaml`` (atomically), and keep the
    table it was chosen from beside it as ``tune_steps.json``. Returns the config path."""
    from diffplan.policies.base import POLICIES

    folder = Path(checkpoint)
    kind = yaml.safe_load((folder / "config.yaml").read_text()).get("kind")
    if kind not in POLICIES:
        raise ConfigError(f"{folder / 'config.yaml'}: unknown policy kind {kind!r}")
    field = POLICIES[kind].steps_field
    path = update_policy_config(folder, {field: int(steps)})
    if rows is not None:
        record = {"field": field, "chosen": int(steps), "rule": "fewest steps within one standard error "
                  "of the best mean", "rows": [asdict(r) for r in rows]}
        write_file(folder / "tune_steps.json", json.dumps(record, indent=2) + "\n")
    return path


def update_policy_config(checkpoint, fields: dict, runtime: dict | None = None) -> Path:
    """Set ``policy.<field>`` and ``policy.runtime.<field>`` in a checkpoint's ``config.yaml``,
    atomically: the tuned settings of a shipped checkpoint. Returns the config path."""
    path = Path(checkpoint) / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    policy = cfg.setdefault("policy", {})
    policy.update(fields)
    if runtime:
        policy.setdefault("runtime", {}).update(runtime)
    write_file(path, yaml.safe_dump(cfg, sort_keys=False))
    return path


def format_rows(rows: list[StepRow], chosen: int | None = None, header: bool = True) -> str:
    lines = [f"{'steps':>5}  {'score':>13}  {'plan p50 ms':>11}  {'plan p10 ms':>11}"] if header else []
    for r in rows:
        mark = "  <- chosen" if r.steps == chosen else ""
        lines.append(f"{r.steps:>5}  {r.score_mean:>6.1f} ± {r.score_stderr:<4.1f}  {r.plan_p50_ms:>11.2f}  "
                     f"{r.plan_p10_ms:>11.2f}{mark}")
    return "\n".join(lines)
