"""CTRL with a return-level condition on the medium-replay locomotion sets, against its baselines.

The pretrained model is ``checkpoints/<dataset>/ctrl_base``: the shipped value-guided Diffuser's
trajectory model without its value net (``DiffuserPlanner.unguided()``; the U-Net trains
unconditionally beside the value net). ``configs/ctrl/<dataset>.yaml`` fits a return-bucket
classifier on the dataset's windows and finetunes an adapter with CTRL so that plans for a requested
bucket are classified as it. Stages::

    python benchmarks/ctrl_returns.py --dataset hopper-medium-replay --stage base  # ctrl_base
    python benchmarks/ctrl_returns.py --dataset hopper-medium-replay --stage ctrl  # finetune (timed)
    python benchmarks/ctrl_returns.py --dataset hopper-medium-replay --stage eval  # one run, RESULTS.md
    python benchmarks/ctrl_returns.py --dataset hopper-medium-replay --stage classifier

``classifier`` asks whether CTRL's reward model reads episodes it never saw. The shipped recipe holds
out random windows for calibration, and most of them overlap training windows of the same episodes.
So the recipe is refitted twice on the same windows: once as shipped, and once with whole episodes
held out (10%). Both are scored on those held-out episodes, and the rows go to RESULTS.md.

A later version of a dataset (``--dataset hopper-medium-replay-v1``) uses the v0 recipes unchanged
on that data: ``configs/ctrl/hopper-medium-replay.yaml`` with ``task`` and the base checkpoint set to
the v1 ones, and the other policies' v1 checkpoints (``checkpoints/hopper-medium-replay-v1/``).

``eval`` measures, on the same episodes (reset seeds 0..E-1) and in one process:

* ``bc``: the shipped BC policy;
* ``base``: ctrl_base as it plans alone (DDIM 20, deterministic), and the base's plans picked by
  CTRL's classifier (the best of ``n_samples`` by ``log p_hat(top | plan)``, as CTRL acts);
* ``classifier guidance``: the base guided by ``grad log p_hat(top | x_t)`` of CTRL's own classifier,
  with the same pick of ``n_samples``, its scale tuned first on reset seeds 1000+ (``--cg-scales``);
* ``value guidance``: the shipped Diffuser (base + its value net);
* return-conditioned training from scratch: the shipped Trajectory Diffuser (Decision Diffuser-style
  CFG on returns in its refiner) and the shipped anchored policy (return-conditioned);
* ``ctrl``: the finetuned adapter asking for the top bucket, as shipped (best of ``n_samples`` by its
  classifier) and with one plan per state;

then the steerability sweep (CTRL asked for each bucket in turn, ``--steer-episodes`` each, saved as
``benchmarks/figures/ctrl_steer_<dataset>.png``), and the compute: CPU seconds per training step of
CTRL, of the Trajectory Diffuser and of the base, measured here in this process and multiplied by
each recipe's steps (CTRL's classifier fit included), and of the anchored policy (return-conditioned,
from scratch).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from results import append_rows, machine, stamp  # noqa: E402

FIGURES = ROOT / "benchmarks" / "figures"


def _ckpt(dataset: str, name: str) -> Path:
    return ROOT / "checkpoints" / dataset / name


def _config(kind: str, dataset: str) -> tuple[dict, str]:
    """(config, how it was made) of ``kind`` on ``dataset``: ``configs/<kind>/<dataset>.yaml``, or
    for a later version of a dataset (``hopper-medium-replay-v1``) its v0 recipe on that dataset,
    CTRL's base being that dataset's ``ctrl_base``."""
    from diffplan.config import apply_overrides
    from diffplan.policies.training import read_config

    path = ROOT / f"configs/{kind}/{dataset}.yaml"
    if path.exists():
        return read_config(path), str(path.relative_to(ROOT))
    path = ROOT / f"configs/{kind}/{dataset.rpartition('-v')[0]}.yaml"
    overrides = [f"task={dataset}"]
    if kind == "ctrl":
        overrides.append(f"policy.base_checkpoint=checkpoints/{dataset}/ctrl_base")
    return apply_overrides(read_config(path), overrides), " ".join([str(path.relative_to(ROOT)), *overrides])


def stage_base(dataset: str) -> None:
    from diffplan.policies import load_policy

    src = _ckpt(dataset, "diffuser")
    base = load_policy(src).unguided()
    out = _ckpt(dataset, "ctrl_base")
    base.save(out, train=base_train_config(src), data={"task": dataset, "dataset": dataset})
    (out / "train.json").write_text(json.dumps({
        "made_from": f"checkpoints/{dataset}/diffuser",
        "how": "DiffuserPlanner.unguided(): the shipped Diffuser's U-Net and normalizer, its value net dropped",
        "steps": json.loads((src / "train.json").read_text()).get("steps"),
        "machine": json.loads((src / "train.json").read_text()).get("machine"),
    }, indent=2) + "\n")
    print(f"wrote {out}")


def base_train_config(src: Path) -> dict:
    import yaml

    return (yaml.safe_load((src / "config.yaml").read_text()) or {}).get("train") or {}


def stage_ctrl(dataset: str) -> None:
    from diffplan.policies.training import train_policy

    cfg, how = _config("ctrl", dataset)
    run = ROOT / f"runs/ctrl-{dataset}"
    if run.exists():
        shutil.rmtree(run)
    t0, c0 = time.perf_counter(), time.process_time()
    policy = train_policy(cfg, run, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = _ckpt(dataset, "ctrl")
    policy.save(out, train=cfg["train"], data={"task": dataset, "dataset": dataset})
    report = getattr(policy, "classifier_report", {})
    (out / "train.json").write_text(json.dumps({
        "config": how, "steps": cfg["train"]["steps"], "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1), "classifier": report, "machine": machine() + ", 1 torch thread",
        "note": "cpu_s: the whole finetuning (classifier fit included), process CPU time",
    }, indent=2) + "\n")
    if (run / "log.csv").exists():
        shutil.copy(run / "log.csv", out / "train_log.csv")
    print(f"CTRL on {dataset}: {cpu:.0f} CPU s; classifier {report}; wrote {out}")


def cpu_per_step(policy, dataset, batch_size: int, n: int = 20) -> float:
    """Process CPU seconds per training step of ``policy`` (after 3 warm-up steps)."""
    from diffplan.train import TrainConfig, Trainer

    def run(steps):
        cfg = TrainConfig(steps=steps, batch_size=batch_size, warmup_steps=1, ema_decay=0.0, progress=False,
                          log_every=10**6)
        trainer = Trainer(policy, policy.batches(dataset, batch_size), cfg)
        c0 = time.process_time()
        trainer.fit()
        return time.process_time() - c0

    run(3)
    return run(n) / n


def measure_compute(dataset: str, data) -> dict:
    from diffplan.policies import load_policy
    from diffplan.policies.training import parse_config

    out = {}
    ctrl = load_policy(_ckpt(dataset, "ctrl"))
    facts = json.loads((_ckpt(dataset, "ctrl") / "train.json").read_text())
    ccfg = _config("ctrl", dataset)[0]["train"]
    out["ctrl_step_s"] = cpu_per_step(ctrl, data, ccfg["batch_size"], n=10)
    out["ctrl_s"] = out["ctrl_step_s"] * ccfg["steps"] + facts["classifier"].get("cpu_s", 0.0)
    for name, key in (("trajectory_diffuser", "scratch"), ("anchored", "anchored"), ("diffuser", "base")):
        cfg = _config(name, dataset)[0]
        if name == "diffuser":  # the base: the trajectory model alone
            cfg["policy"] = {**cfg["policy"], "value_guided": False}
        cls, pcfg, tcfg = parse_config(cfg, progress=False)
        torch.manual_seed(0)
        policy = cls.from_dataset(data, pcfg)
        out[f"{key}_step_s"] = cpu_per_step(policy, data, tcfg.batch_size)
        out[f"{key}_s"] = out[f"{key}_step_s"] * tcfg.steps
    return out


def stage_eval(dataset: str, episodes: int, steer_episodes: int, cg_scales: list[float], num_envs: int) -> None:
    from diffplan.data import load
    from diffplan.eval import evaluate
    from diffplan.policies import load_policy

    def score(policy, n=episodes, seed=0):
        t0 = time.perf_counter()
        r = evaluate(policy, episodes=n, num_envs=min(num_envs, n), seed=seed)
        print(f"  {r.normalized_mean:6.1f} ± {r.normalized_stderr:4.1f}  ({n} episodes, seed {seed}+, "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
        return r

    cells = {}
    for name, folder in (("bc", "bc"), ("base (DDIM 20)", "ctrl_base"), ("value guidance (shipped Diffuser)", "diffuser"),
                         ("from scratch: Trajectory Diffuser (CFG on returns)", "trajectory_diffuser"),
                         ("from scratch: anchored (return-conditioned)", "anchored")):
        print(name, flush=True)
        cells[name] = score(load_policy(_ckpt(dataset, folder)))

    ctrl = load_policy(_ckpt(dataset, "ctrl"))
    n = ctrl.config.n_samples
    if n > 1:
        ctrl.config.sampler, ctrl.config.target = "pretrained", "top"
        print(f"base, best of {n} by the classifier", flush=True)
        cells[f"base, best of {n} by the classifier"] = score(ctrl)
    ctrl.config.sampler, ctrl.config.target = "classifier_guidance", "top"
    tuning = {}
    for s in cg_scales:
        ctrl.config.guide_scale = s
        print(f"classifier guidance, scale {s} (tuning seeds)", flush=True)
        tuning[s] = score(ctrl, n=10, seed=1000).normalized_mean
    best = max(tuning, key=tuning.get)
    ctrl.config.guide_scale = best
    print(f"classifier guidance, scale {best}", flush=True)
    pick = f", best of {n}" if n > 1 else ""
    cells[f"classifier guidance (scale {best:g}, tuned{pick})"] = score(ctrl)

    ctrl.config.sampler = "ctrl"
    if n > 1:
        ctrl.config.n_samples = 1
        print("ctrl, top bucket, one plan", flush=True)
        cells["ctrl (top bucket, one plan)"] = score(ctrl)
        ctrl.config.n_samples = n
    print(f"ctrl, top bucket{pick}", flush=True)
    cells["ctrl (top bucket)"] = score(ctrl)

    cells["base (DDIM 20)"].write_metrics(_ckpt(dataset, "ctrl_base"))
    cells["ctrl (top bucket)"].write_metrics(_ckpt(dataset, "ctrl"))  # as shipped: sampler ctrl, target top

    steer = []
    for label in ctrl.config.label_names:
        ctrl.config.target = label
        print(f"ctrl, bucket {label}", flush=True)
        r = cells["ctrl (top bucket)"] if label == "top" and steer_episodes == episodes else score(ctrl, n=steer_episodes)
        steer.append((label, r.normalized_mean, r.normalized_stderr))

    print("compute", flush=True)
    compute = measure_compute(dataset, load(dataset))
    print(json.dumps(compute, indent=2))
    png = plot_steer(dataset, ctrl, steer, cells)

    c = cells["ctrl (top bucket)"]
    rows = [[*stamp(), dataset, name, f"{r.normalized_mean:.1f} ± {r.normalized_stderr:.1f}", str(r.episodes),
             f"{r.latency_p50_ms:.1f}"] for name, r in cells.items()]
    append_rows("ctrl returns", (
        "CTRL with a return-level condition (benchmarks/ctrl_returns.py): D4RL-normalized score, mean ± standard "
        "error over the same episodes (reset seeds 0..E-1) in one run; act p50 is one act() for the batch of "
        "10 envs. Classifier guidance uses CTRL's own classifier at the scale that scored best on 10 tuning "
        "episodes (seeds 1000+)."),
        ["date", "machine", "commit", "dataset", "policy", "score", "episodes", "act p50 ms"], rows)
    edges = ctrl.bucket_edges.tolist()
    append_rows("ctrl returns: steerability", (
        "CTRL asked for each return bucket in turn (b0 lowest .. top; buckets are eighths of the windows' "
        "discounted returns to go), achieved D4RL-normalized score, mean ± standard error; the plot is "
        "benchmarks/figures/ctrl_steer_<dataset>.png."),
        ["date", "machine", "commit", "dataset", "episodes per bucket", "bucket edges (discounted return)",
         "achieved score per bucket"],
        [[*stamp(), dataset, str(steer_episodes), " / ".join(f"{e:.0f}" for e in edges),
          ", ".join(f"{lab} {m:.1f} ± {s:.1f}" for lab, m, s in steer)]])
    append_rows("ctrl returns: compute", (
        "Training compute, process CPU seconds on one torch thread: per-step cost measured in one process "
        "here, times each recipe's steps (CTRL: its finetuning steps plus its classifier fit as measured when "
        "it was trained). From scratch: the Trajectory Diffuser (return-conditioned, CFG) recipe. Base: the "
        "Diffuser's trajectory model recipe (it was trained on a GPU; this is its cost here)."),
        ["date", "machine", "commit", "dataset", "CTRL CPU s", "from scratch CPU s", "CTRL / from scratch",
         "base CPU s", "CTRL / base", "anchored CPU s", "CTRL / anchored"],
        [[*stamp(), dataset, f"{compute['ctrl_s']:.0f}", f"{compute['scratch_s']:.0f}",
          f"{compute['ctrl_s'] / compute['scratch_s']:.2f}", f"{compute['base_s']:.0f}",
          f"{compute['ctrl_s'] / compute['base_s']:.2f}", f"{compute['anchored_s']:.0f}",
          f"{compute['ctrl_s'] / compute['anchored_s']:.2f}"]])
    print(f"CTRL {c.normalized_mean:.1f} ± {c.normalized_stderr:.1f}; plot {png}")


def stage_classifier(dataset: str) -> None:
    """The return classifier's recipe, fitted as shipped and with whole episodes held out, scored on
    held-out episodes: accuracy, NLL, the share of true top-bucket windows among the 12.5% rated
    most "top", and the rank correlation of the expected bucket with the true one."""
    from diffplan.data import load
    from diffplan.policies import load_policy
    from diffplan.policies.finetune.ctrl import LabelClassifier, fit_classifier

    ctrl = load_policy(_ckpt(dataset, "ctrl"))
    x, y, episode = ctrl._labelled_windows(load(dataset), ctrl.config.classifier_windows,
                                           np.random.default_rng(0), episodes=True)
    rng = np.random.default_rng(1)
    eps = np.unique(episode)
    rng.shuffle(eps)
    unseen = torch.as_tensor(np.isin(episode, eps[: len(eps) // 10]))
    top = ctrl.n_labels - 1

    def scores(cls) -> list[str]:
        with torch.no_grad():
            logits = cls.logits(x[unseen])
        yv, p = y[unseen], logits.softmax(-1)
        k = max(1, len(yv) // 8)
        rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
        expected = (p * torch.arange(p.shape[1])).sum(-1).numpy()
        return [f"{float((logits.argmax(-1) == yv).float().mean()):.3f}",
                f"{float(torch.nn.functional.cross_entropy(logits, yv)):.3f}",
                f"{float((yv[p[:, top].topk(k).indices] == top).float().mean()):.3f}",
                f"{np.corrcoef(rank(expected), rank(yv.numpy()))[0, 1]:.3f}",
                f"{float(cls.log_temperature.exp()):.2f}"]

    rows = []
    for name, held_out in (("as shipped: random windows held out", False), ("whole episodes held out", True)):
        keep = ~unseen if held_out else torch.ones_like(unseen)
        torch.manual_seed(0)
        cls = LabelClassifier(x.shape[1], x.shape[2], ctrl.n_labels)
        report = fit_classifier(cls, x[keep], y[keep], steps=ctrl.config.classifier_steps)
        if held_out:  # calibrated on the unseen episodes, as the recipe calibrates on its held-out windows
            cls.calibrate(x[unseen], y[unseen])
        rows.append([*stamp(), dataset, name, f"{report['val_acc']:.3f}", *scores(cls)])
        print(" | ".join(rows[-1][3:]))
    append_rows("ctrl classifier", "CTRL's return classifier (the shipped recipe: "
                f"{ctrl.config.classifier_steps} steps on {ctrl.config.classifier_windows} windows, "
                f"{ctrl.n_labels} buckets) fitted two ways, scored on 10% of the episodes. As shipped, those "
                "episodes' windows are mostly in its training split; held out, it never saw them.",
                ["date", "machine", "commit", "dataset", "fit", "own held-out accuracy",
                 "accuracy on the episodes", "NLL", "top precision at 12.5%", "rank correlation",
                 "temperature"], rows)


def plot_steer(dataset: str, ctrl, steer, cells) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"ctrl_steer_{dataset}.png"
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(steer))
    ax.errorbar(x, [m for _, m, _ in steer], yerr=[s for _, _, s in steer], marker="o", capsize=3, label="CTRL")
    for name, style in (("bc", ":"), ("base (DDIM 20)", "--")):
        ax.axhline(cells[name].normalized_mean, ls=style, color="gray", label=name)
    ax.set_xticks(x, [lab for lab, _, _ in steer])
    ax.set_xlabel("requested return bucket (eighths of the data's discounted returns to go)")
    ax.set_ylabel("achieved D4RL-normalized score")
    ax.set_title(f"CTRL steerability, {dataset}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--stage", choices=("base", "ctrl", "eval", "classifier"), required=True)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--steer-episodes", type=int, default=10)
    p.add_argument("--num-envs", type=int, default=10)
    p.add_argument("--cg-scales", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.stage == "base":
        stage_base(a.dataset)
    elif a.stage == "ctrl":
        stage_ctrl(a.dataset)
    elif a.stage == "classifier":
        stage_classifier(a.dataset)
    else:
        stage_eval(a.dataset, a.episodes, a.steer_episodes, a.cg_scales, a.num_envs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
