"""Copy a run's final checkpoint into ``checkpoints/<task>/<kind>/`` with its training facts.

    python benchmarks/ship_checkpoint.py runs/diffuser-medium [--name diffuser] [--config PATH]

Writes ``model.safetensors``, ``config.yaml``, ``trainer_state.json`` (no optimizer state), the
run's ``log.csv`` as ``train_log.csv``, and ``train.json``: steps, wall time summed from the log's
per-interval steps/s, mean steps/s, and the machine. The checkpoint's config is copied as trained.

``--refiner-from DIFFUSER`` (Trajectory Diffusers with ``refiner_from``): ship the run's drafter with
the given Diffuser's U-Net as its refiner. The drafter trains on data windows alone, so it does not
depend on which checkpoint of that Diffuser the run copied; this attaches the shipped one and
records it in the config, which is what training with ``refiner_from: DIFFUSER`` writes.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def log_wall_s(log: Path) -> tuple[int, float]:
    """(last step, wall seconds) of a run from its log.csv: each row covers the steps since the
    previous one at the row's steps/s."""
    steps, wall, prev = 0, 0.0, 0
    with log.open() as f:
        for row in csv.DictReader(f):
            step, rate = int(row["step"]), float(row["it/s"])
            wall += (step - prev) / max(rate, 1e-9)
            prev = steps = step
    return steps, wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--name", help="folder name under checkpoints/<task>/ (default: the policy kind)")
    ap.add_argument("--config", help="the config file the run was trained from, recorded in train.json")
    ap.add_argument("--refiner-from", help="TD: attach this Diffuser checkpoint's U-Net as the refiner")
    args = ap.parse_args(argv)
    step_dirs = sorted((args.run / "checkpoints").glob("step-*"))
    if not step_dirs:
        raise SystemExit(f"{args.run}: no checkpoints/step-* folders")
    src = step_dirs[-1]
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    dest = ROOT / "checkpoints" / cfg["spec"]["task"] / (args.name or cfg["kind"])
    if args.refiner_from:
        import dataclasses

        from diffplan.policies import load_policy

        td = load_policy(src)
        td.config = dataclasses.replace(td.config, refiner_from=args.refiner_from)
        td.load_refiner(ROOT / args.refiner_from)
        td.save(dest, **{k: v for k, v in cfg.items() if k not in ("kind", "spec", "policy")})  # replaces dest
    else:
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "config.yaml"):
            shutil.copy2(src / name, dest / name)
    shutil.copy2(src / "trainer_state.json", dest / "trainer_state.json")
    (dest / ".complete").unlink(missing_ok=True)  # a shipped folder is a plain folder
    steps, wall = log_wall_s(args.run / "log.csv")
    shutil.copy2(args.run / "log.csv", dest / "train_log.csv")
    info = {"config": args.config, "steps": steps, "wall_s": round(wall), "steps_per_s": round(steps / wall, 2),
            "machine": f"{machine()}, 1 torch thread, CPU shared with other jobs",
            "note": "EMA weights of the final step; optimizer state not shipped; wall from the log's it/s"}
    if args.config:  # a run trained from a config on another task (``task=<task>-v1``) says so
        trained_on = yaml.safe_load(Path(args.config).read_text()).get("task")
        if trained_on != cfg["spec"]["task"]:
            info["overrides"] = [f"task={cfg['spec']['task']}"]
            info["note"] += f"; trained with `diffplan train {args.config} task={cfg['spec']['task']}`"
    (dest / "train.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"{src} -> {dest}: {steps} steps, {wall / 60:.0f} min, {steps / wall:.1f} steps/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
