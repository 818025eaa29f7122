"""CTRL on pointmaze-umaze: label accuracy, normalized score, KL to the pretrained model, cost.

The pretrained model is a small goal-agnostic Diffuser (``configs/ctrl/pointmaze-umaze-base.yaml``:
start inpainted only). The label is the free cell a plan ends in; acting with ``target="goal"``
asks for the cell of the env's goal. Four ways to sample a plan for a requested label, with the
same base architecture, sampler (10 DDIM steps, eta=1) and PD tracking:

* ``pretrained``: the base model, label ignored (the unconditional planner);
* ``classifier_guidance``: the base model plus ``grad_x log p_hat(y | x_t)`` of the clean-window
  classifier CTRL uses (plain classifier guidance: the classifier never saw noise);
* ``cfg``: a label-conditioned U-Net of the same size trained from scratch with classifier-free
  guidance (label dropout 0.2, guidance weight ``--cfg-w``) for ``--cfg-steps`` steps (the RESULTS.md
  rows: 800 steps, 42 CPU s, i.e. about 10% of the base's pretraining);
* ``ctrl``: the finetuned adapter (``configs/ctrl/pointmaze-umaze.yaml``).

Stages (each reuses the previous outputs under ``runs/``)::

    python benchmarks/ctrl.py --stage base     # pretrain the base (timed)
    python benchmarks/ctrl.py --stage cfg      # train the CFG baseline (timed)
    python benchmarks/ctrl.py --stage ctrl     # classifier + CTRL finetuning (timed)
    python benchmarks/ctrl.py --stage eval     # measure everything, append to RESULTS.md
    python benchmarks/ctrl.py --stage curve    # label accuracy of each saved CTRL step vs its compute

``--config`` and ``--run`` train and read another CTRL recipe (a config file, a run folder under
``runs/``) with the same accuracy and cost definitions; ``--recipe`` labels its curve rows.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
TASK = "pointmaze-umaze"
BASE_RUN, CFG_RUN, CTRL_RUN = ROOT / "runs/ctrl-umaze-base", ROOT / "runs/ctrl-umaze-cfg", ROOT / "runs/ctrl-umaze"


def _timed(name: str, fn):
    """Run ``fn``; returns (its result, wall s, process CPU s). Training is single-threaded, so the
    process CPU time is the compute used, unaffected by other jobs sharing the machine."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"{name}: {wall:.0f} s wall, {cpu:.0f} s CPU")
    return out, wall, cpu


def stage_base():
    from diffplan.policies.training import read_config, train_policy

    cfg = read_config(ROOT / "configs/ctrl/pointmaze-umaze-base.yaml")
    policy, wall, cpu = _timed("pretrain", lambda: train_policy(cfg, BASE_RUN, progress=False))
    policy.save(BASE_RUN / "final")
    (BASE_RUN / "pretrain_time.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu}))


class CFGDiffuser(nn.Module):
    """The CFG baseline: the base's U-Net with a label input, trained from scratch with label dropout."""

    def __init__(self, base, n_labels: int, p_drop: float = 0.2):
        super().__init__()
        from diffplan.nn import TemporalUNet

        c = base.config
        self.net = TemporalUNet(base.dim, dim=c.dim, dim_mults=c.dim_mults, cond_dim=n_labels)
        self.normalizer, self.schedule, self.n_labels, self.p_drop = base.normalizer, base.schedule, n_labels, p_drop
        self.obs_dim = base.obs_dim

    def loss(self, batch):
        from diffplan.diffusion import diffusion_loss
        from diffplan.policies.diffuser import window_constraints

        x0 = self.normalizer.normalize(batch["x"])
        cond = F.one_hot(batch["y"].long(), self.n_labels).float()
        cond = cond * (torch.rand(cond.shape[0], 1) > self.p_drop)  # zeros: the null label
        loss = diffusion_loss(self.net, x0, self.schedule, "x0", cond=cond,
                              constraints=window_constraints(x0, self.obs_dim, False))
        return loss, {"diffusion": loss.detach()}


def stage_cfg(steps: int):
    from diffplan.config import from_dict
    from diffplan.data import load
    from diffplan.policies import DiffuserConfig, DiffuserPlanner
    from diffplan.policies.finetune.ctrl import end_cell_labels, maze_label_names
    from diffplan.policies.training import read_config
    from diffplan.train import TrainConfig, Trainer

    data = load(TASK)  # the base's normalizer is fitted on the data alone, so the CFG net needs no base weights
    base_cfg = read_config(ROOT / "configs/ctrl/pointmaze-umaze-base.yaml")["policy"]
    base = DiffuserPlanner.from_dataset(data, from_dict(DiffuserConfig, base_cfg))
    windows = base._windows(data)
    n_labels = len(maze_label_names(TASK))
    model = CFGDiffuser(base, n_labels)
    model.normalizer.requires_grad_(False)

    def batches(step, rng):
        x = windows.sample(32, rng)["observations"]
        return {"x": x, "y": np.maximum(end_cell_labels(TASK, x[:, -1, :2]), 0)}

    cfg = TrainConfig(steps=steps, batch_size=32, lr=5e-4, warmup_steps=100, min_lr_ratio=0.1, progress=False,
                      log_every=100, ckpt_every=10 * steps)
    _, wall, cpu = _timed("cfg train", lambda: Trainer(model, batches, cfg, CFG_RUN / "train").fit())
    from safetensors.torch import save_file

    save_file(model.net.state_dict(), str(CFG_RUN / "net.safetensors"))
    (CFG_RUN / "train_time.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "steps": steps}))


def policy_steps(run: Path) -> int:
    from diffplan.train import latest_checkpoint

    return int(latest_checkpoint(run).name.split("-")[1])


def stage_ctrl(steps: int | None, resume: bool, config: Path = ROOT / "configs/ctrl/pointmaze-umaze.yaml"):
    from diffplan.policies.training import read_config, train_policy

    cfg = read_config(config)
    cfg["policy"]["base_checkpoint"] = str(BASE_RUN / "final")
    policy, wall, cpu = _timed("ctrl (classifier + finetune)",
                          lambda: train_policy(cfg, CTRL_RUN, steps=steps, resume=resume, progress=False))
    policy.save(CTRL_RUN / "final")
    if resume:  # a continued run: add the earlier time
        before = json.loads((CTRL_RUN / "ctrl_time.json").read_text())
        wall, cpu = wall + before["wall_s"], cpu + before["cpu_s"]
    rep = {"wall_s": wall, "cpu_s": cpu, "steps": policy_steps(CTRL_RUN),
           "classifier": getattr(policy, "classifier_report", None)}
    (CTRL_RUN / "ctrl_time.json").write_text(json.dumps(rep))
    print(rep)


# ---------------------------------------------------------------------------------------------

def _cfg_planner(ctrl, w: float):
    """A CTRL planner object whose plans come from the CFG net instead (same labels, sampler, PD)."""
    import copy

    from safetensors.torch import load_file

    from diffplan.diffusion import cfg_denoiser, sample
    from diffplan.nn import TemporalUNet

    c = ctrl.config.base
    net = TemporalUNet(ctrl.dim, dim=c.dim, dim_mults=c.dim_mults, cond_dim=ctrl.n_labels)
    net.load_state_dict(load_file(str(CFG_RUN / "net.safetensors")))
    planner = copy.deepcopy(ctrl)

    def plan(obs, goal, noise, *, warm=None, t_start=1.0, steps=None, labels=None, generator=None):
        if labels is None:
            labels = planner.target_labels(planner.config.target if planner._target is None else planner._target,
                                           obs.shape[0], goal)
        cond = F.one_hot(labels, planner.n_labels).float()
        denoise = cfg_denoiser(net, cond, torch.zeros(planner.n_labels), w)
        x = noise * planner.schedule.sigma(torch.tensor(1.0))
        return sample(denoise, x, planner.schedule, solver="ddim", eta=1.0, steps=steps or planner.config.steps,
                      constraints=planner.constraints(obs), noise_prior=False, generator=generator)

    planner.plan = plan
    return planner


def _with_sampler(ctrl, sampler: str):
    import copy
    import dataclasses

    p = copy.deepcopy(ctrl)
    p.config = dataclasses.replace(p.config, sampler=sampler)
    return p


def label_accuracy(planner, starts: torch.Tensor, labels: list[int], reps: int) -> dict[int, float]:
    """Every label requested from every start: fraction of plans whose true end cell is the requested
    one, per requested label. Includes cells far from that start, which offline windows of the
    horizon's length rarely connect (CTRL with ``label_sampling: data`` never practices them)."""
    out = {}
    obs = starts.repeat_interleave(reps, 0)
    for y in labels:
        ys = torch.full((obs.shape[0],), y, dtype=torch.long)
        torch.manual_seed(y)
        with torch.no_grad():
            plans = planner.plan(obs, None, torch.randn(obs.shape[0], *planner.plan_shape), labels=ys)
        states = planner.plan_states(plans).numpy()
        out[y] = float((planner.labels_of(states) == y).mean())
    return out


def pair_accuracy(planner, starts: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict[int, float]]:
    """Requested labels drawn as the data draws them: ``(start, label)`` of the same offline window,
    so every request is reachable within the horizon. Returns (overall, per label) accuracy."""
    torch.manual_seed(0)
    with torch.no_grad():
        plans = planner.plan(starts, None, torch.randn(starts.shape[0], *planner.plan_shape), labels=labels)
    hit = planner.labels_of(planner.plan_states(plans).numpy()) == labels.numpy()
    per = {int(y): float(hit[labels.numpy() == y].mean()) for y in labels.unique()}
    return float(hit.mean()), per


def stage_eval(episodes: int, cfg_w: float, n_starts: int):
    from results import append_rows, stamp

    from diffplan.data import load
    from diffplan.eval import evaluate
    from diffplan.policies import load_policy

    ctrl = load_policy(CTRL_RUN / "final")
    data = load(TASK)
    rng = np.random.default_rng(123)
    windows = ctrl._windows(data).sample(4 * n_starts, rng)["observations"]
    starts = torch.as_tensor(windows[:n_starts, 0])
    pair_labels = torch.as_tensor(ctrl.labels_of(windows))
    keep = pair_labels >= 0
    pair_starts, pair_labels = torch.as_tensor(windows[:, 0])[keep], pair_labels[keep]
    names = ctrl.config.label_names
    requested = list(range(len(names)))

    def cpu(rep):  # compute as single-thread process CPU seconds (older runs recorded wall time only)
        return rep.get("cpu_s", rep["wall_s"])

    pre = json.loads((BASE_RUN / "pretrain_time.json").read_text())
    cfg_t = json.loads((CFG_RUN / "train_time.json").read_text()) if (CFG_RUN / "train_time.json").is_file() else None
    ctrl_rep = json.loads((CTRL_RUN / "ctrl_time.json").read_text())
    methods = {"pretrained": _with_sampler(ctrl, "pretrained"),
               "classifier_guidance": _with_sampler(ctrl, "classifier_guidance"),
               "ctrl": ctrl}
    if cfg_t is not None:
        methods[f"cfg (w={cfg_w:g})"] = _cfg_planner(ctrl, cfg_w)
    cost = {"pretrained": f"{cpu(pre):.0f} CPU s pretrain", "classifier_guidance": "classifier only",
            f"cfg (w={cfg_w:g})": "" if cfg_t is None else
            f"{cpu(cfg_t):.0f} CPU s, {cfg_t['steps']} steps from scratch",
            "ctrl": f"{cpu(ctrl_rep):.0f} CPU s ({100 * cpu(ctrl_rep) / cpu(pre):.0f}% of pretrain)"}
    rows = []
    for name, planner in methods.items():
        planner.eval()
        pair_acc, pair_per = pair_accuracy(planner, pair_starts, pair_labels)
        acc = label_accuracy(planner, starts, requested, reps=1)
        kl = ctrl.path_kl(pair_starts, pair_labels) if name == "ctrl" else None
        torch.manual_seed(0)
        rep = evaluate(planner, TASK, episodes=episodes, num_envs=10, seed=0, record=0)
        acc_mean = float(np.mean(list(acc.values())))
        print(f"{name:22s} data-pair acc {pair_acc:.3f}  every-label acc {acc_mean:.3f}  score "
              f"{rep.normalized_mean:.1f} +- {rep.normalized_stderr:.1f}  success {rep.success_rate}  kl {kl}")
        rows.append([*stamp(), TASK, name, f"{pair_acc:.2f} ({len(pair_labels)})",
                     " ".join(f"{names[y]}:{a:.2f}" for y, a in pair_per.items()), f"{acc_mean:.2f}",
                     f"{rep.normalized_mean:.1f} +- {rep.normalized_stderr:.1f}", str(episodes),
                     "-" if kl is None else f"{kl:.1f}", cost[name]])
    append_rows("ctrl", "CTRL label conditioning on a goal-agnostic Diffuser (benchmarks/ctrl.py). Label = the free "
                "cell a plan ends in; accuracy over requested labels from data start states (one plan per start and "
                "label); score = normalized return acting with target='goal' (PD tracking, replan every 16 steps); "
                "KL = Monte-Carlo path KL(p_theta(.|y) || p_pre) per plan in nats; CPU, 1 thread, shared machine.",
                ["date", "machine", "commit", "task", "method", "label acc, data pairs (n)", "per label (data pairs)",
                 "label acc, every label from every start", "score", "episodes", "KL", "training cost"], rows)


def _train_section(ckpt: Path) -> dict:
    import yaml

    return yaml.safe_load((ckpt / "config.yaml").read_text())["train"]


def stage_curve(n_starts: int, label: str | None = None):
    """Label accuracy (data pairs) of every saved CTRL checkpoint against its finetuning compute."""
    from results import append_rows, stamp

    from diffplan.data import load
    from diffplan.policies import load_policy

    pre = json.loads((BASE_RUN / "pretrain_time.json").read_text())["cpu_s"]
    rep = json.loads((CTRL_RUN / "ctrl_time.json").read_text())
    clf_s = (rep.get("classifier") or {}).get("cpu_s", 0.0)
    per_step = (rep["cpu_s"] - clf_s) / rep["steps"]
    data = load(TASK)
    rows = []
    for ckpt in sorted((CTRL_RUN / "checkpoints").glob("step-*")):
        step = int(ckpt.name.split("-")[1])
        ctrl = load_policy(ckpt)
        ctrl.eval()
        windows = ctrl._windows(data).sample(4 * n_starts, np.random.default_rng(123))["observations"]
        labels = torch.as_tensor(ctrl.labels_of(windows))
        keep = labels >= 0
        acc, _ = pair_accuracy(ctrl, torch.as_tensor(windows[:, 0])[keep], labels[keep])
        cost = clf_s + step * per_step
        print(f"step {step:5d}  data-pair acc {acc:.3f}  cost {cost:.0f} CPU s ({100 * cost / pre:.1f}% of pretrain)")
        t = _train_section(ckpt)
        recipe = (f"lr {t['lr']:g} {t['lr_schedule']}, EMA {t['ema_decay']:g}, batch {t['batch_size']}, "
                  f"{t['steps']} steps")
        c = ctrl.config
        grad = (f"grad through last {c.grad_steps} steps" if c.grad_steps else
                "random truncation" + (" (early steps no-grad)" if c.no_grad_early else "") if c.truncate else
                "full backprop")
        labels = c.label_sampling + " labels"
        if c.label_sampling == "target":
            labels = (f"{c.target_fraction:g} of each batch asks for {c.target!r} from {c.target_starts} data starts"
                      + (f" ({c.rest_fraction:g} of them at rest)" if c.rest_fraction else "") + ", the rest data labels")
        recipe = ((f"{label}: " if label else "") + f"K={c.finetune_steps or c.steps} (plans {c.steps}), {grad}, "
                  f"classifier {c.classifier_steps} steps, {labels}, alpha {c.alpha:g}, "
                  + (f"reward temperature {c.reward_temperature:g}, " if c.reward_temperature != 1 else "") + recipe)
        rows.append([*stamp(), TASK, recipe, str(step), f"{acc:.2f}", f"{cost:.0f}", f"{100 * cost / pre:.1f}%"])
    append_rows("ctrl: label accuracy vs finetuning compute",
                "`python benchmarks/ctrl.py --stage curve`: every saved CTRL checkpoint of one run; accuracy on "
                "(start, label) pairs of offline windows; cost = classifier fit + finetuning steps so far, in "
                "single-thread process CPU seconds, against the base's pretraining CPU seconds.",
                ["date", "machine", "commit", "task", "recipe", "finetune step", "label acc, data pairs",
                 "cost CPU s", "% of pretrain"], rows)


def main():
    global CTRL_RUN
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["base", "cfg", "ctrl", "eval", "curve"], required=True)
    ap.add_argument("--cfg-steps", type=int, default=300)
    ap.add_argument("--ctrl-steps", type=int, default=None, help="override the config's train.steps")
    ap.add_argument("--resume", action="store_true", help="continue the CTRL run to --ctrl-steps")
    ap.add_argument("--cfg-w", type=float, default=2.0)
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--starts", type=int, default=64)
    ap.add_argument("--config", type=Path, default=ROOT / "configs/ctrl/pointmaze-umaze.yaml",
                    help="CTRL config for --stage ctrl")
    ap.add_argument("--run", default=CTRL_RUN.name, help="CTRL run folder under runs/ (ctrl, eval, curve)")
    ap.add_argument("--recipe", default=None, help="label of the curve rows")
    args = ap.parse_args()
    CTRL_RUN = ROOT / "runs" / args.run
    if args.stage == "base":
        stage_base()
    elif args.stage == "cfg":
        stage_cfg(args.cfg_steps)
    elif args.stage == "ctrl":
        stage_ctrl(args.ctrl_steps, args.resume, args.config)
    elif args.stage == "curve":
        stage_curve(args.starts, args.recipe)
    else:
        stage_eval(args.episodes, args.cfg_w, args.starts)


if __name__ == "__main__":
    main()
