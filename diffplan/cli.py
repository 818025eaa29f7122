"""The ``diffplan`` command line.

Command groups are added to the parser by one ``add_<group>_commands(groups)`` function each;
every command is one ``cmd_<group>_<name>(args) -> int`` function. Errors a user can fix
(`USER_ERRORS`, and argparse's usage errors) print one line ``diffplan: error: ...`` to stderr and
exit with code 2; any other exception prints one ``diffplan: internal error: ...`` line and exits
with code 1. ``--debug`` (anywhere on the command line) shows the traceback instead. Library
warnings print as one ``diffplan: warning: ...`` line.

    diffplan data list                  tasks, and whether each dataset is made
    diffplan data make NAME [--force]   run a task's dataset recipe and cache it (Minari)
    diffplan data info NAME|ID|PATH     counts, episode stats, return distribution, ref scores
    diffplan train CONFIG.yaml [K=V]    train a policy (checkpoints, logs, resume; config overrides)
    diffplan eval CHECKPOINT [--env ID] score a checkpoint on its task or an env; report in runs/eval/
    diffplan bench CHECKPOINT           act() latency, decisions/s, network evaluations
    diffplan tune-steps CHECKPOINT      score/latency per solver step count; store the fewest good
    diffplan demo                       evaluate the shipped pointmaze-umaze Diffuser
    diffplan doctor [PATH ...]          check cached datasets and checkpoints, say how to heal them
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Sequence

import numpy as np

from pathlib import Path

from diffplan.config import ConfigError, apply_overrides
from diffplan.data import DatasetError
from diffplan.envs import UnknownTaskError
from diffplan.policies.base import ActionError, ObservationError
from diffplan.train.checkpoint import CheckpointError, latest_checkpoint

# Exceptions that mean "the request was wrong", reported as one line (exit code 2).
USER_ERRORS: tuple[type[BaseException], ...] = (DatasetError, UnknownTaskError, ConfigError, CheckpointError,
                                                 ObservationError, ActionError, OSError)


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other error, and ``--debug`` on
    every (sub)command."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the traceback of an error")

    def error(self, message: str):
        self.exit(2, f"diffplan: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffplan", description="Planning with diffusion models: data, training, evaluation.")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    add_data_commands(groups)
    add_policy_commands(groups)
    add_doctor_command(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse(build_parser(), argv)
    except SystemExit as done:  # --help, or a usage error already printed
        return int(done.code or 0)
    debug = getattr(args, "debug", False)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print("diffplan: interrupted", file=sys.stderr)
            return 130
        except Exception as err:
            if debug:
                raise
            if isinstance(err, USER_ERRORS):
                print(f"diffplan: error: {_one_line(err)}", file=sys.stderr)
                return 2
            print(f"diffplan: internal error: {type(err).__name__}: {_one_line(err)} "
                  "(rerun with --debug for the traceback)", file=sys.stderr)
            return 1


def _one_line(err: BaseException) -> str:
    return re.sub(r"\s*\n\s*", " ", str(err).strip()) or type(err).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"diffplan: warning: {_one_line(message)}", file=sys.stderr)


def _at_least(low: int):
    """An argparse type: a whole number >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"whole number >= {low}"
    return parse


def _list_of(item):
    """An argparse type: comma-separated values of type ``item``."""

    def parse(text: str) -> list:
        return [item(part.strip()) for part in text.split(",")]

    parse.__name__ = "comma-separated list"
    return parse


def _parse(parser: argparse.ArgumentParser, argv):
    """``parse_args``, except that ``KEY=VALUE`` overrides may also follow options (argparse
    fills a positional list only once)."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


# ---- diffplan data ---------------------------------------------------------------------------

def add_data_commands(groups) -> None:
    data = groups.add_parser("data", help="list, make and inspect offline datasets")
    sub = data.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("list", help="registered tasks and whether their datasets are made")
    p.set_defaults(func=cmd_data_list)

    p = sub.add_parser("make", help="make a task's dataset and cache it as a Minari dataset")
    p.add_argument("name", help="task name (see `diffplan data list`)")
    p.add_argument("--force", action="store_true", help="remake it even if it is cached")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_data_make)

    p = sub.add_parser("info", help="statistics of a dataset")
    p.add_argument("name", help="task name, local Minari id, or .hdf5 / .npz path")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_data_info)


def cmd_data_list(args) -> int:
    from diffplan.data import datasets_root
    from diffplan.envs import get_task, list_tasks

    rows = [("task", "env", "steps/ep", "ref min", "ref max", "dataset", "minari id")]
    for name in list_tasks():
        card = get_task(name)
        rows.append((name, card.env_id, str(card.episode_steps), f"{card.ref_min_score:g}",
                     f"{card.ref_max_score:g}", card.dataset_health()[0].replace("missing", "-"),
                     card.dataset_id))
    _print_table(rows)
    print(f"\ndatasets folder: {datasets_root()} (MINARI_DATASETS_PATH)")
    return 0


def cmd_data_make(args) -> int:
    from diffplan.envs import get_task

    card = get_task(args.name)
    state, problem = card.dataset_health()
    if state in ("incomplete", "corrupt") and not args.force:
        print(f"{card.name}: the cached dataset is {state} ({problem}); remaking it")
    # Checked again under the make lock: a concurrent `data make` may finish it meanwhile.
    data = card.cache_dataset(progress=not args.quiet, force=args.force)
    if data is None:
        print(f"{card.name}: already made ({card.dataset_id}); use --force to remake it")
        return 0
    print(f"{card.name}: {len(data):,} steps in {data.num_episodes:,} episodes -> "
          f"{card.dataset_id}")
    return 0


def cmd_data_info(args) -> int:
    from diffplan.data import from_minari, load
    from diffplan.envs import get_task, list_tasks

    card = get_task(args.name) if args.name in list_tasks() else None
    if card is not None and card.dataset_health()[0] == "missing":
        _print_card(card)
        print(f"dataset   not made yet: run `diffplan data make {card.name}`")
        return 0
    # A task's cache is read as it is: a damaged one is reported, not silently remade.
    data = from_minari(card.dataset_id) if card is not None else load(args.name, progress=False)
    summary = data.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    if card is not None:
        _print_card(card)
    print(f"source    {data.source}")
    print(f"env       {data.env_id or '?'} {json.dumps(data.env_kwargs, default=str)[:200]}")
    goal = f"  goal_dim {summary['goal_dim']}" if summary["goal_dim"] else ""
    print(f"size      {summary['num_steps']:,} steps, {summary['num_episodes']:,} episodes; "
          f"obs_dim {summary['obs_dim']}  act_dim {summary['act_dim']}{goal}")
    print(f"ends      {summary['num_terminals']:,} terminals, {summary['num_timeouts']:,} timeouts")
    print(f"length    {_fmt_stats(summary['episode_length'])}")
    print(f"return    {_fmt_stats(summary['episode_return'])}")
    print(f"reward    min {summary['reward']['min']:g}  max {summary['reward']['max']:g}  "
          f"mean {summary['reward']['mean']:.4g}")
    _print_histogram(data.episode_returns(), "episode returns")
    if data.ref_min_score is not None and data.ref_max_score is not None:
        print(f"refs      min {data.ref_min_score:g}  max {data.ref_max_score:g}")
    return 0


# ---- diffplan train / eval / bench / demo -------------------------------------------------------

DEMO_CHECKPOINT = "checkpoints/pointmaze-umaze/diffuser"


def add_policy_commands(groups) -> None:
    p = groups.add_parser(
        "train", help="train a policy from a YAML config",
        description="Train a policy from a YAML config. KEY=VALUE arguments override config entries, "
                    "e.g. `policy.horizon=64 train.lr=1e-4`; values are YAML scalars or [lists], "
                    "unknown keys are refused, and the run's config.yaml records the result.")
    p.add_argument("config", help="YAML config, e.g. configs/diffuser/pointmaze-umaze.yaml (shipped configs "
                                  "are found from any folder)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. policy.horizon=64 train.lr=1e-4")
    p.add_argument("--dataset", metavar="ID_OR_PATH",
                   help="train on this dataset instead of the config's: a task name, a local Minari id, "
                        "or a .hdf5 / .npz file or Minari folder")
    p.add_argument("--out", help="run folder (default runs/<config name>)")
    p.add_argument("--steps", type=_at_least(1), help="override train.steps")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the config's)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = groups.add_parser("eval", help="evaluate a checkpoint on its task or on a Gymnasium env")
    p.add_argument("checkpoint", help="checkpoint folder (or a run folder: its latest checkpoint)")
    p.add_argument("--env", metavar="ENV_ID",
                   help="a diffplan task or Gymnasium env id (default: the checkpoint's task, else the env "
                        "its dataset recorded)")
    p.add_argument("--ref-min", type=float, help="return that scores 0 (default: the task's; none for an env)")
    p.add_argument("--ref-max", type=float, help="return that scores 100; without references the score "
                                                 "is the raw return")
    _eval_args(p, episodes=100)
    p.add_argument("--out", help="report folder (default: runs/eval/<name>, name: the run folder, or "
                                 "<task>-<kind> for a shipped checkpoint)")
    p.set_defaults(func=cmd_eval)

    p = groups.add_parser("bench", help="act() latency, decisions/s and network evaluations")
    p.add_argument("checkpoint")
    p.add_argument("--batch", type=_list_of(_at_least(1)), default=[1, 64],
                   help="comma-separated batch sizes (default 1,64)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=_list_of(_at_least(1)), default=[None],
                   help="comma-separated solver step counts (default: the policy's)")
    p.add_argument("--warm-start", action="store_true", help="warm-start replans from the last plan")
    p.add_argument("--calls", type=_at_least(1), default=200, help="act() calls timed per row")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time plans replayed from CUDA graphs: an eager and a captured row each (CUDA only)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_bench)

    p = groups.add_parser(
        "tune-steps", help="score and time a checkpoint at several solver step counts on tuning seeds, "
        "and store the fewest steps within one standard error of the best as its default")
    p.add_argument("checkpoint", help="checkpoint folder (or a run folder: its latest checkpoint)")
    p.add_argument("--steps", type=_list_of(_at_least(0)), default=[1, 2, 3, 5, 10],
                   help="comma-separated step counts (default 1,2,3,5,10; a Trajectory Diffuser also takes 0, "
                        "its draft alone)")
    p.add_argument("--episodes", type=_at_least(2), default=50, help="episodes per step count (default 50)")
    p.add_argument("--num-envs", type=_at_least(1), default=10, help="envs stepped in lockstep (default 10)")
    p.add_argument("--seed", type=_at_least(0), default=1000,
                   help="first tuning seed (default 1000; reported scores use seeds from 0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dry-run", action="store_true", help="print the table, leave config.yaml as it is")
    p.set_defaults(func=cmd_tune_steps)

    p = groups.add_parser("demo", help="evaluate the shipped pointmaze-umaze Diffuser (about a minute)")
    _eval_args(p, episodes=30)
    p.add_argument("--checkpoint", default=DEMO_CHECKPOINT)
    p.add_argument("--out", default="diffplan-demo", help="report folder (default ./diffplan-demo)")
    p.set_defaults(func=cmd_demo)


def _eval_args(p, episodes: int) -> None:
    p.add_argument("--episodes", type=_at_least(1), default=episodes, help="episodes to run (default %(default)s)")
    p.add_argument("--num-envs", type=_at_least(1), default=10, help="envs stepped in parallel (default %(default)s)")
    p.add_argument("--seed", type=_at_least(0), default=0,
                   help="episode i resets with seed SEED+i (default %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device of the policy (default %(default)s)")
    p.add_argument("--video", action="store_true",
                   help="also write episode 0 as a video: the env rendered offscreen (mp4, or gif without "
                        "imageio-ffmpeg); for mazes the plans drawn over the walls (gif)")


def cmd_train(args) -> int:
    from diffplan.policies.training import parse_config, read_config, train_policy
    from diffplan.resources import find

    path = find(args.config)
    cfg = apply_overrides(read_config(path), args.overrides)
    if args.dataset:
        cfg["dataset"] = args.dataset
    out = Path(args.out or Path("runs") / path.stem)
    parse_config(cfg, steps=args.steps, device=args.device)  # every key and value checked before the run folder
    latest = latest_checkpoint(out)
    if latest is not None and not args.resume:
        raise ConfigError(f"{out} already holds a run (latest checkpoint {latest.name}); pass --resume to "
                          "continue it, or --out to train into another folder")
    print(f"training {cfg['kind']} on {cfg.get('dataset') or cfg.get('task')} -> {out}")
    train_policy(cfg, out, steps=args.steps, device=args.device, resume=args.resume)
    print(f"done: load it with diffplan.load_policy({str(out)!r}) or `diffplan eval {out}`")
    return 0


def _evaluate(checkpoint, args, out: Path | None, env=None, refs=(None, None)):
    """Evaluate a checkpoint and write its report to ``out`` (default ``runs/eval/<name>``);
    nothing is written into the checkpoint (shipped metrics.json files come from benchmarks/)."""
    from diffplan.eval import evaluate
    from diffplan.policies import load_policy

    policy = load_policy(checkpoint, device=args.device)
    report = evaluate(policy, env, episodes=args.episodes, num_envs=args.num_envs, seed=args.seed,
                      progress=True, video=args.video, ref_min_score=refs[0], ref_max_score=refs[1])
    out = report.save(out or Path("runs") / "eval" / _run_name(policy.checkpoint_path), video=args.video)
    print(report.summary())
    files = ["report.json", "report.png"] + ([p.name for p in out.glob("episode.*")] if args.video else [])
    print(f"report in {out}/: {', '.join(files)}")
    return report


def _run_name(checkpoint: Path) -> str:
    """The run folder's name (``runs/x/checkpoints/step-N`` -> ``x``); ``<task>-<kind>`` for a
    shipped ``checkpoints/<task>/<kind>``."""
    run = checkpoint.resolve()
    if run.name.startswith("step-"):
        run = run.parent
    if run.name == "checkpoints":
        run = run.parent
    return f"{run.parent.name}-{run.name}" if run.parent.parent.name == "checkpoints" else run.name


def cmd_eval(args) -> int:
    _evaluate(args.checkpoint, args, Path(args.out) if args.out else None, env=args.env,
              refs=(args.ref_min, args.ref_max))
    return 0


def cmd_demo(args) -> int:
    from diffplan.resources import find

    ckpt = find(args.checkpoint)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} not found (the shipped demo checkpoint is "
                                f"{DEMO_CHECKPOINT})")
    print(f"diffplan demo: {ckpt} on its task, {args.episodes} episodes, {args.num_envs} envs in parallel")
    report = _evaluate(ckpt, args, Path(args.out))
    print(f"score {report.normalized_mean:.1f} ± {report.normalized_stderr:.1f} (the expert is 100), "
          f"{report.decisions_per_s:.0f} decisions/s")
    return 0


def cmd_bench(args) -> int:
    from diffplan.policies import load_policy
    from diffplan.runtime.bench import bench_policy, format_table

    if args.cuda_graph and not str(args.device).startswith("cuda"):
        raise ConfigError(f"--cuda-graph needs --device cuda (on {args.device} every plan runs eagerly)")
    policy = load_policy(args.checkpoint, device=args.device)
    graphs = [False, True] if args.cuda_graph else [None]
    rows = [bench_policy(policy, batch=b, calls=args.calls, steps=s, warm_start=args.warm_start or None,
                         cuda_graph=g)
            for b in args.batch for s in args.steps for g in graphs]
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(f"{policy.kind} ({policy.spec.task}) on {args.device}")
        print(format_table(rows))
    return 0


def cmd_tune_steps(args) -> int:
    from diffplan.eval.tune import format_rows, tune_steps, write_default_steps
    from diffplan.policies import load_policy
    from diffplan.resources import find

    steps = args.steps
    ckpt = find(args.checkpoint)
    policy = load_policy(ckpt, device=args.device)
    field = policy.steps_field
    print(f"{policy.kind} ({policy.spec.task}): {field} in {steps}, {args.episodes} episodes each "
          f"(seeds {args.seed}..{args.seed + args.episodes - 1}), plan latency at batch 1")
    rows, chosen = tune_steps(policy, steps=steps, episodes=args.episodes, num_envs=args.num_envs,
                              seed=args.seed, progress=True)
    print(format_rows(rows, chosen))
    if args.dry_run:
        print(f"fewest steps within one standard error of the best: {chosen} (--dry-run: config unchanged)")
    else:
        path = write_default_steps(getattr(policy, "checkpoint_path", ckpt), chosen, rows)
        print(f"{field}: {chosen} written to {path}")
    return 0


# ---- diffplan doctor ---------------------------------------------------------------------------

def add_doctor_command(groups) -> None:
    p = groups.add_parser("doctor", help="check cached datasets and checkpoints; say how to heal bad ones")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="checkpoint or run folders, searched recursively (default: ./checkpoints if present)")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    """Exit code 0 when everything is whole, 1 when something is not (each printed with its fix)."""
    import os

    from diffplan.data.minari_io import (dataset_path, datasets_root, local_minari_datasets,
                                         minari_dataset_health, recover_minari_datasets,
                                         remake_command)
    from diffplan.envs import get_task, list_tasks
    from diffplan.train.checkpoint import CONFIG_FILE, MODEL_FILE, recover_checkpoints

    task_of = {get_task(name).dataset_id: name for name in list_tasks()}
    problems: list[tuple[str, str]] = []  # (what is wrong, the command that heals it)
    dataset_ids = local_minari_datasets()
    for dataset_id in dataset_ids:
        state, problem = minari_dataset_health(dataset_id, made_by_diffplan=dataset_id in task_of)
        if state != "made":
            problems.append((f"dataset {dataset_id} is {state}: {problem}",
                             remake_command(task_of.get(dataset_id), dataset_path(dataset_id))))
    problems += _leftovers(recover_minari_datasets(dry_run=True))

    roots = [Path(p) for p in args.paths] or [p for p in [Path("checkpoints")] if p.is_dir()]
    checked = 0
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder")
        for parent, children, files in os.walk(root):
            children[:] = sorted(c for c in children if not c.startswith("."))
            problems += _leftovers(recover_checkpoints(parent, dry_run=True))
            if MODEL_FILE in files or CONFIG_FILE in files:
                checked += 1
                problems += _checkpoint_problems(Path(parent))

    print(f"checked {len(dataset_ids)} datasets in {datasets_root()} and {checked} checkpoints"
          + (f" under {', '.join(map(str, roots))}" if roots else ""))
    for problem, fix in problems:
        print(f"BAD  {problem}\n     fix: {fix}")
    print(f"{len(problems)} problem(s) found" if problems else "all good")
    return 1 if problems else 0


def _leftovers(plan: list[tuple[Path, Path | None]]) -> list[tuple[str, str]]:
    """Problems and fixes for the hidden copies killed writers left (`diffplan.atomic.recover`)."""
    return [(f"{path} is the only complete copy left by a killed writer; {dest.name} is missing",
             f"mv {path} {dest}") if dest else
            (f"{path} is a partial or stale copy left by a killed writer", f"rm -r {path}")
            for path, dest in plan]


def _checkpoint_problems(folder: Path) -> list[tuple[str, str]]:
    from diffplan.train.checkpoint import OPTIMIZER_FILE, TRAINER_STATE_FILE, load_checkpoint

    try:
        load_checkpoint(folder, resume_state=False)
    except CheckpointError as err:
        return [(f"checkpoint {err}", f"rm -r {folder}")]
    try:
        load_checkpoint(folder)
    except CheckpointError as err:
        return [(f"checkpoint {err} (it loads for inference, but cannot be resumed)",
                 f"rm -f {folder / OPTIMIZER_FILE} {folder / TRAINER_STATE_FILE}")]
    return []


def _print_card(card) -> None:
    print(f"task      {card.name} ({card.family}), dataset id {card.dataset_id}")
    print(f"eval      {card.env_id}, {card.episode_steps} steps, "
          f"{json.dumps(dict(card.eval_kwargs), default=str)}")
    d4rl = ""
    if card.d4rl_ref_min_score is not None:
        d4rl = f"  (D4RL: {card.d4rl_ref_min_score:g} / {card.d4rl_ref_max_score:g})"
    optimal = card.extras.get("ref_optimal_score")
    optimal = f"  near-optimal {optimal:g}" if optimal is not None else ""
    print(f"refs      min {card.ref_min_score:g}  max {card.ref_max_score:g}{optimal}{d4rl}")
    print(f"          {card.ref_note}")
    print(f"recipe    {card.recipe}")


def _fmt_stats(stats: dict) -> str:
    return "  ".join(f"{key} {stats[key]:.4g}" for key in
                     ("min", "p10", "median", "p90", "max", "mean", "std"))


def _print_histogram(values: np.ndarray, label: str, bins: int = 10, width: int = 40) -> None:
    counts, edges = np.histogram(values, bins=bins)
    print(f"{label}:")
    top = max(int(counts.max()), 1)
    for count, lo, hi in zip(counts, edges[:-1], edges[1:]):
        bar = "#" * round(width * count / top)
        print(f"  [{lo:10.4g}, {hi:10.4g})  {count:8d}  {bar}")


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    raise SystemExit(main())
