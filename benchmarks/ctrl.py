"""CTRL on pointmaze-umaze: label accuracy, normalized score, KL to the pretrained model, cost.

The pretrained model is a small goal-agnostic Diffuser (``configs/ctrl/pointmaze-umaze-base.yaml``:
start inpainted only). The label is the free cell a plan ends in; acting with ``target="goal"``
asks for the cell of the env's goal. Four ways to sample a plan for a requested label, with the
same base architecture, sampler (10 DDIM steps, eta=1) and PD tracking:

* ``pretrained``: the base model, label ignored (the unconditional planner);
* ``classifier_guidance``: the base model plus ``grad_x log p_hat(y | x_t)`` of the clean-window
  classifier CTRL uses (plain classifier guidance: the classifier never saw noise);
* ``cfg``: a label-conditioned U-Net of the same size trained from scratch with classifier-free
  guidance (label dropout 0.2, guidance weight ``--cfg-w``) for ``--cfg-steps`` steps (default:
  about CTRL's finetuning wall time on this machine, i.e. the same extra compute);
* ``ctrl``: the finetuned adapter (``configs/ctrl/pointmaze-umaze.yaml``).

Stages (each reuses the previous outputs under ``runs/``)::

    python benchmarks/ctrl.py --stage base     # pretrain the base (timed)
    python benchmarks/ctrl.py --stage cfg      # train the CFG baseline (timed)
    python benchmarks/ctrl.py --stage ctrl     # classifier + CTRL finetuning (timed)
    python benchmarks/ctrl.py --stage eval     # measure everything, append to RESULTS.md
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
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    print(f"{name}: {wall:.0f} s")
    return out, wall


def stage_base():
    from diffplan.policies.training import read_config, train_policy

    cfg = read_config(ROOT / "configs/ctrl/pointmaze-umaze-base.yaml")
    policy, wall = _timed("pretrain", lambda: train_policy(cfg, BASE_RUN, progress=False))
    policy.save(BASE_RUN / "final")
    (BASE_RUN / "pretrain_time.json").write_text(json.dumps({"wall_s": wall}))


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
    _, wall = _timed("cfg train", lambda: Trainer(model, batches, cfg, CFG_RUN / "train").fit())
    from safetensors.torch import save_file

    save_file(model.net.state_dict(), str(CFG_RUN / "net.safetensors"))
    (CFG_RUN / "train_time.json").write_text(json.dumps({"wall_s": wall, "steps": steps}))


def stage_ctrl(steps: int | None, resume: bool):
    from diffplan.policies.training import read_config, train_policy

    cfg = read_config(ROOT / "configs/ctrl/pointmaze-umaze.yaml")
    cfg["policy"]["base_checkpoint"] = str(BASE_RUN / "final")
    policy, wall = _timed("ctrl (classifier + finetune)",
                          lambda: train_policy(cfg, CTRL_RUN, steps=steps, resume=resume, progress=False))
    policy.save(CTRL_RUN / "final")
    if resume:  # a continued run: add the earlier wall time
        wall += json.loads((CTRL_RUN / "ctrl_time.json").read_text())["wall_s"]
    rep = {"wall_s": wall, **getattr(policy, "classifier_report", {})}
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

    def plan(obs, goal, noise, *, warm=None, t_start=1.0, steps=None, labels=None):
        if labels is None:
            labels = planner.target_labels(planner.config.target if planner._target is None else planner._target,
                                           obs.shape[0], goal)
        cond = F.one_hot(labels, planner.n_labels).float()
        denoise = cfg_denoiser(net, cond, torch.zeros(planner.n_labels), w)
        x = noise * planner.schedule.sigma(torch.tensor(1.0))
        return sample(denoise, x, planner.schedule, solver="ddim", eta=1.0, steps=steps or planner.config.steps,
                      constraints=planner.constraints(obs), noise_prior=False)

    planner.plan = plan
    return planner


def _with_sampler(ctrl, sampler: str):
    import copy
    import dataclasses

    p = copy.deepcopy(ctrl)
    p.config = dataclasses.replace(p.config, sampler=sampler)
    return p


def label_accuracy(planner, starts: torch.Tensor, labels: list[int], reps: int) -> dict[int, float]:
    """Fraction of plans whose true end cell is the requested one, per requested label."""
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


def stage_eval(episodes: int, cfg_w: float, n_starts: int):
    from results import append_rows, stamp

    from diffplan.data import load
    from diffplan.eval import evaluate
    from diffplan.policies import load_policy

    ctrl = load_policy(CTRL_RUN / "final")
    data = load(TASK)
    rng = np.random.default_rng(123)
    starts = torch.as_tensor(ctrl._windows(data).sample(n_starts, rng)["observations"][:, 0])
    names = ctrl.config.label_names
    requested = list(range(len(names)))
    pre_s = json.loads((BASE_RUN / "pretrain_time.json").read_text())["wall_s"]
    cfg_t = json.loads((CFG_RUN / "train_time.json").read_text()) if (CFG_RUN / "train_time.json").is_file() else None
    ctrl_rep = json.loads((CTRL_RUN / "ctrl_time.json").read_text())
    methods = {"pretrained": _with_sampler(ctrl, "pretrained"),
               "classifier_guidance": _with_sampler(ctrl, "classifier_guidance"),
               "ctrl": ctrl}
    if cfg_t is not None:
        methods[f"cfg (w={cfg_w:g})"] = _cfg_planner(ctrl, cfg_w)
    cost = {"pretrained": f"{pre_s:.0f} s pretrain", "classifier_guidance": "classifier only",
            f"cfg (w={cfg_w:g})": "" if cfg_t is None else f"{cfg_t['wall_s']:.0f} s, {cfg_t['steps']} steps from scratch",
            "ctrl": f"{ctrl_rep['wall_s']:.0f} s ({100 * ctrl_rep['wall_s'] / pre_s:.0f}% of pretrain)"}
    rows = []
    for name, planner in methods.items():
        planner.eval()
        acc = label_accuracy(planner, starts, requested, reps=1)
        kl = ctrl.path_kl(starts.repeat(len(requested), 1),
                          torch.arange(len(requested)).repeat_interleave(len(starts))) if name == "ctrl" else None
        torch.manual_seed(0)
        rep = evaluate(planner, TASK, episodes=episodes, num_envs=10, seed=0, record=0)
        acc_mean = float(np.mean(list(acc.values())))
        print(f"{name:22s} acc {acc_mean:.3f} {acc}  score {rep.normalized_mean:.1f} +- {rep.normalized_stderr:.1f} "
              f"success {rep.success_rate}  kl {kl}")
        rows.append([*stamp(), TASK, name, f"{acc_mean:.2f}",
                     " ".join(f"{names[y]}:{a:.2f}" for y, a in acc.items()),
                     f"{rep.normalized_mean:.1f} +- {rep.normalized_stderr:.1f}", str(episodes),
                     "-" if kl is None else f"{kl:.1f}", cost[name]])
    append_rows("ctrl", "CTRL label conditioning on a goal-agnostic Diffuser (benchmarks/ctrl.py). Label = the free "
                "cell a plan ends in; accuracy over requested labels from data start states (one plan per start and "
                "label); score = normalized return acting with target='goal' (PD tracking, replan every 16 steps); "
                "KL = Monte-Carlo path KL(p_theta(.|y) || p_pre) per plan in nats; CPU, 1 thread, shared machine.",
                ["date", "machine", "commit", "task", "method", "label acc", "per label", "score", "episodes",
                 "KL", "training cost"], rows)


def main():
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["base", "cfg", "ctrl", "eval"], required=True)
    ap.add_argument("--cfg-steps", type=int, default=300)
    ap.add_argument("--ctrl-steps", type=int, default=None, help="override the config's train.steps")
    ap.add_argument("--resume", action="store_true", help="continue the CTRL run to --ctrl-steps")
    ap.add_argument("--cfg-w", type=float, default=2.0)
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--starts", type=int, default=64)
    args = ap.parse_args()
    if args.stage == "base":
        stage_base()
    elif args.stage == "cfg":
        stage_cfg(args.cfg_steps)
    elif args.stage == "ctrl":
        stage_ctrl(args.ctrl_steps, args.resume)
    else:
        stage_eval(args.episodes, args.cfg_w, args.starts)


if __name__ == "__main__":
    main()
