"""CTRL: add label conditioning to a pretrained diffusion planner by RL finetuning with a KL anchor.

Zhao et al. 2024, "Adding Conditional Control to Diffusion Models with Reinforcement Learning".
The pretrained model ``p_pre(x)`` is frozen; a small zero-initialized adapter turns it into
``p_theta(x | y)`` by maximizing (their eq. 4, with the path KL of their eq. 6)

    E_y E_{x ~ p_theta(.|y)} [ log p_hat(y | x0) ] - alpha * KL(p_theta(.|y) || p_pre),
    KL = sum_i ||mu_theta(x_i, t_i, y) - mu_pre(x_i, t_i)||^2 / (2 c_i^2),

whose optimum for ``alpha = 1`` is ``p_pre(x) p_hat(y | x)``: classifier guidance without a
classifier at intermediate noise levels (smaller alpha sharpens the label).

What it trains
    1. ``LabelClassifier`` ``p_hat(y | x0)``: an MLP over the flattened normalized window, trained
       with cross-entropy on clean offline windows and temperature-calibrated on a held-out split.
       Labels: ``end_cell`` (mazes: the free cell the window ends in) or ``return_bucket`` (reward
       tasks: ``n_buckets`` quantile buckets of the window's discounted return to go, or with
       ``return_kind: episode`` of its whole episode's return).
    2. ``AdaptedDenoiser``: the frozen pretrained net with a zero-initialized label embedding added
       to its noise-level embedding, plus a zero-initialized residual side network (an MLP
       denoiser conditioned on the label). At init it is bit-identical to the pretrained net;
       with ``cond=None`` it *is* the pretrained net (the frozen reference, no copy needed).
    3. The finetuning loss (``CTRLPlanner.loss``, run by the shared Trainer): K steps of DDIM with
       eta=1 (= DDPM posterior sampling; K = ``finetune_steps``, by default the planning ``steps``) of
       the adapted model, with the reference evaluated on the same ``x_t`` at every step; the
       inpainted current state is applied identically to both. Gradients flow through the chain
       from a random step on (earlier steps are detached: truncated backprop; with
       ``no_grad_early`` they run as below) and the trainer clips the gradient norm. With ``grad_steps = k > 0``
       (DRaFT-K, Clark et al. 2024) only the last k steps carry the reward gradient: the earlier
       ones run under ``no_grad`` without the reference, and their KL enters through one of them
       drawn at random (an unbiased estimate of their KL and of its direct gradient), so an update
       costs about K no-grad forwards plus k + 1 backward passes instead of ~K of each.
       Which (start, label) pairs it practices: ``label_sampling`` "data" (both from one offline
       window), "uniform" (any label), or "target": a fraction ``target_fraction`` of each batch asks
       for the label acting will ask for (``target``; "goal" is the maze's eval goal cell), from any
       data start or from starts of windows that reach it (``target_starts``), some of them at rest
       (``rest_fraction``). ``reward_temperature`` softens the classifier's logits in the reward.

How it acts
    Like Diffuser: the current state is inpainted, a plan is sampled with the K-step DDIM chain
    of the adapted model for the requested label, and a PD controller tracks it (or, with the
    base's ``action_mode: plan``, its planned action is executed). The
    label comes from ``config.target`` or ``act(obs, target=...)``: a label name (``"r1c1"``,
    ``"top"``, ``"b0"``), an index, a return level (a float: the bucket holding it), ``"goal"``
    (mazes: the cell of ``obs["desired_goal"]``) or one per env. Plans use ``eta`` (1: the
    stochastic chain finetuning trains; 0: deterministic DDIM on the same denoisers). With
    ``n_samples = n > 1`` each env plans n candidates and keeps the one the classifier rates most
    likely to carry the requested label (the reward CTRL was finetuned on).
    ``config.sampler`` also gives the two baselines with the same classifier and base model:
    ``"pretrained"`` (adapter off) and ``"classifier_guidance"`` (gradient of ``log p_hat(y|x_t)``).

Checkpoints are self-contained: the base weights, adapter and classifier are all saved (the
base is small next to a shipped checkpoint limit, and a checkpoint that needs another folder to
load breaks as soon as that folder moves); ``base_checkpoint`` records where the base came from.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffplan.data import GaussianNormalizer, LimitsNormalizer, SequenceWindows
from diffplan.diffusion import (
    Constraints,
    ValueGuidance,
    make_denoiser,
    noise_level,
    randn,
    sample,
    time_grid,
)
from diffplan.nn import MLPDenoiser, TemporalUNet
from diffplan.policies.base import PolicyBase, SpaceSpec, register_policy
from diffplan.policies.diffuser import (
    SCHEDULES,
    DiffuserConfig,
    DiffuserPlanner,
    candidate_noise,
    pd_tracking,
    plan_constraints,
    rest_at_goal_pad,
)
from diffplan.runtime.planner import PlannerConfig

LABEL_KINDS = ("end_cell", "return_bucket")
SAMPLERS = ("ctrl", "pretrained", "classifier_guidance")
LABEL_SAMPLINGS = ("data", "uniform", "target")
RETURN_KINDS = ("discounted", "episode")


@dataclass
class CTRLConfig:
    base: DiffuserConfig = field(default_factory=DiffuserConfig)  # the pretrained planner (filled from the checkpoint)
    base_checkpoint: str | None = None  # where the pretrained planner is loaded from (from_dataset)
    label_kind: str = "end_cell"  # "end_cell" (mazes) | "return_bucket" (reward tasks)
    label_names: tuple[str, ...] = ()  # filled by from_dataset, e.g. ("r1c1", ...) or ("b0", .., "top")
    n_buckets: int = 4  # return_bucket only: quantile buckets of the windows' returns
    return_kind: str = "discounted"  # return_bucket: "discounted" (the window's discounted return to go,
    # Diffuser's value target) or "episode" (the return of the window's whole episode: the return level
    # of the behavior that made it, which a window shows without knowing how much time is left)
    target: str | float = "goal"  # default requested label: a name, "goal" (mazes), "top" (best return bucket),
    # or a return level (a float, in the units of return_kind), which asks for the bucket holding it
    sampler: str = "ctrl"  # "ctrl" | "pretrained" | "classifier_guidance"
    steps: int = 10  # K stochastic DDIM steps (eta=1), in planning (and finetuning unless finetune_steps)
    finetune_steps: int = 0  # K of the finetuning chain; 0: the same as steps
    eta: float = 1.0  # planning only: 1 samples the stochastic chain that finetuning trains, 0 runs DDIM
    # deterministically on the same denoisers (one plan per state, as the locomotion Diffusers plan)
    alpha: float = 0.1  # KL weight (the reward log p_hat has weight 1)
    truncate: bool = True  # backprop through the chain from a random step on (when grad_steps is 0)
    grad_steps: int = 0  # > 0: backprop only through the last grad_steps steps, earlier ones without grad (DRaFT-K)
    no_grad_early: bool = False  # steps before the truncation point without grad, their KL from one drawn step
    label_sampling: str = "data"  # "data": (start, label) of the same data window; "uniform": any label;
    # "target": a fraction ``target_fraction`` of each batch asks for the label ``target`` names (the one the
    # policy will be asked for; "goal": the maze task's eval goal cell) from data starts, the rest as "data"
    target_fraction: float = 0.5
    target_starts: str = "any"  # "any": any data start; "reaching": starts of data windows that end in that label
    rest_fraction: float = 0.0  # of those target rows, this fraction starts as an eval episode does: mazes zero the
    # start's velocity (also how the planner holds still at the goal); reward tasks take the first state of a
    # random data episode (env resets), where a policy must get going from
    reward_temperature: float = 1.0  # reward log p_hat with the calibrated logits divided by this (> 1: a softer
    # classifier that keeps rewarding plans that end deeper inside the requested label's region)
    side_hidden: int = 128
    side_depth: int = 2
    label_lr_scale: float = 10.0  # reparametrized embedding: Adam moves it this much faster (ref: lr 1e-2 vs 1e-3)
    classifier_hidden: int = 256
    classifier_steps: int = 2000
    classifier_windows: int = 50_000  # clean windows drawn for the classifier (10% held out)
    guide_scale: float = 0.1  # classifier_guidance sampler
    n_guide_steps: int = 2
    n_samples: int = 1  # acting: candidate plans per env (each from its own noise); the one the classifier
    # gives the highest log p_hat(requested label | plan) is kept (every sampler: the same pick for the baselines)
    runtime: PlannerConfig = field(default_factory=lambda: PlannerConfig(n_action_steps=16))

    def __post_init__(self):
        if self.label_kind not in LABEL_KINDS:
            raise ValueError(f"label_kind must be one of {LABEL_KINDS}, got {self.label_kind!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.return_kind not in RETURN_KINDS:
            raise ValueError(f"return_kind must be one of {RETURN_KINDS}, got {self.return_kind!r}")
        if self.label_sampling not in LABEL_SAMPLINGS:
            raise ValueError(f"label_sampling must be one of {LABEL_SAMPLINGS}, got {self.label_sampling!r}")
        if not 0.0 <= self.target_fraction <= 1.0:
            raise ValueError(f"target_fraction must be in [0, 1], got {self.target_fraction}")
        if self.target_starts not in ("any", "reaching"):
            raise ValueError(f"target_starts must be 'any' or 'reaching', got {self.target_starts!r}")
        if not self.reward_temperature > 0:
            raise ValueError(f"reward_temperature must be > 0, got {self.reward_temperature}")
        if not 0.0 <= self.rest_fraction <= 1.0:
            raise ValueError(f"rest_fraction must be in [0, 1], got {self.rest_fraction}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.finetune_steps < 0:
            raise ValueError(f"finetune_steps must be >= 0 (0: steps), got {self.finetune_steps}")
        k = self.finetune_steps or self.steps
        if not 0 <= self.grad_steps <= k:
            raise ValueError(f"grad_steps must be in [0, finetuning steps={k}], got {self.grad_steps}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")


# ---------------------------------------------------------------------------------------------
# 1. The label classifier p_hat(y | x0)

class LabelClassifier(nn.Module):
    """``p_hat(y | x0)``: an MLP over the flattened normalized window ``x (B, H, D)`` -> ``(B, L)``
    logits, divided by a calibrated temperature (Guo et al. 2017)."""

    def __init__(self, horizon: int, dim: int, n_labels: int, hidden: int = 256):
        super().__init__()
        self.shape = (horizon, dim)
        self.net = nn.Sequential(nn.Linear(horizon * dim, hidden), nn.Mish(), nn.Linear(hidden, hidden), nn.Mish(),
                                 nn.Linear(hidden, n_labels))
        self.register_buffer("log_temperature", torch.zeros(()))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"LabelClassifier expects windows (B, {self.shape[0]}, {self.shape[1]}), got {tuple(x.shape)}")
        return self.net(x.flatten(1)) / self.log_temperature.exp()

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``log p_hat(y | x)``: (B,) for windows (B, H, D) and labels (B,)."""
        return self.logits(x).log_softmax(-1).gather(1, y[:, None]).squeeze(1)

    def loss(self, batch):  # for the Trainer
        loss = F.cross_entropy(self.logits(batch["x"]), batch["y"].long())
        return loss, {"ce": loss.detach()}

    @torch.no_grad()
    def nll(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(F.cross_entropy(self.logits(x), y.long()))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Set the temperature that minimizes the NLL of held-out ``(x, y)``; returns (NLL before, after)."""
        before = self.nll(x, y)
        self.log_temperature.zero_()
        raw = self.logits(x)
        grid = torch.linspace(-3.0, 3.0, 241)  # log T; a 1-D convex problem, a grid is exact enough
        nlls = torch.stack([F.cross_entropy(raw / g.exp(), y.long()) for g in grid])
        self.log_temperature.fill_(float(grid[nlls.argmin()]))
        return before, self.nll(x, y)


def fit_classifier(classifier: LabelClassifier, x: torch.Tensor, y: torch.Tensor, steps: int = 2000,
                   batch_size: int = 256, lr: float = 1e-3, holdout: float = 0.1, seed: int = 0) -> dict:
    """Train on ``1 - holdout`` of ``(x (N, H, D), y (N,))`` with the shared Trainer, calibrate the
    temperature on the rest. Returns held-out NLL before/after calibration and accuracy."""
    from diffplan.train import TrainConfig, Trainer

    n_val = max(1, int(len(x) * holdout))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, tr = perm[:n_val], perm[n_val:]
    xt, yt = x[tr], y[tr]

    def batches(step, rng):
        i = rng.integers(0, len(xt), batch_size)
        return {"x": xt[i], "y": yt[i]}

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(100, steps // 10),
                      ema_decay=0.0, progress=False, log_every=max(1, steps), weight_decay=1e-4)
    cpu0 = time.process_time()
    Trainer(classifier, batches, cfg).fit()
    before, after = classifier.calibrate(x[val], y[val])
    with torch.no_grad():
        acc = float((classifier.logits(x[val]).argmax(-1) == y[val]).float().mean())
    return {"val_nll_raw": before, "val_nll_calibrated": after, "val_acc": acc,
            "temperature": float(classifier.log_temperature.exp()), "cpu_s": time.process_time() - cpu0}


# ---------------------------------------------------------------------------------------------
# 2. The adapter

class LabelEmbedding(nn.Module):
    """Wraps a frozen net's noise-level embedding: ``e(t) + onehot(y) @ (scale * W)``, W zero-init.

    ``cond``: (B, L) one-hot (or soft) labels; ``None`` gives the frozen embedding exactly."""

    def __init__(self, base: nn.Module, n_labels: int, out_dim: int, scale: float = 1.0):
        super().__init__()
        self.base, self.scale = base, scale
        self.weight = nn.Parameter(torch.zeros(n_labels, out_dim))

    def forward(self, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        e = self.base(t)
        return e if cond is None else e + cond @ (self.scale * self.weight)


class AdaptedDenoiser(nn.Module):
    """``forward(x (B, H, D), t (B,), cond (B, L) | None) -> (B, H, D)``: the frozen pretrained
    ``net`` with a label embedding and a residual side network, both zero-initialized.

    ``cond=None`` is the pretrained net itself (the KL reference). ``net`` must have an
    ``embed`` (``TimeCondEmbedding`` without a condition), as ``TemporalUNet`` and ``MLPDenoiser`` do.
    """

    def __init__(self, net: nn.Module, horizon: int, dim: int, n_labels: int, hidden: int = 128, depth: int = 2,
                 label_lr_scale: float = 1.0):
        super().__init__()
        if getattr(net.embed, "cond_mlp", None) is not None:
            raise ValueError("AdaptedDenoiser needs an unconditional pretrained net (cond_dim=0)")
        for p in net.parameters():
            p.requires_grad_(False)
        out_dim = net.embed.time_mlp[-1].out_features
        net.embed = LabelEmbedding(net.embed, n_labels, out_dim, label_lr_scale)
        self.net = net
        self.side = MLPDenoiser(dim, horizon, hidden=hidden, depth=depth, cond_dim=n_labels)
        nn.init.zeros_(self.side.out.weight)
        nn.init.zeros_(self.side.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        out = self.net(x, t, cond)
        return out if cond is None else out + self.side(x, t, cond)

    def adapter_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# 3. The finetuning objective

def ddpm_coefficients(schedule, steps: int, device=None):
    """DDIM eta=1 on ``time_grid(steps)``: ``x_s = k_x x_t + k_d D + c z`` per step (float32),
    with ``var`` = c^2 floored at its smallest positive value (the last step lands on sigma=0 and
    is deterministic; its divergence is weighted like the step before)."""
    ts = time_grid(steps, device=device)
    a, s = schedule.alpha(ts), schedule.sigma(ts)
    a_t, s_t, a_s, s_s = a[:-1], s[:-1], a[1:], s[1:]
    c = (s_s / s_t) * (s_t**2 - (a_t * s_s / a_s) ** 2).clamp(min=0).sqrt()
    k_x = (s_s**2 - c**2).clamp(min=0).sqrt() / s_t
    k_d = a_s - k_x * a_t
    var = c**2
    var = var.clamp(min=float(var[var > 0].min()) if bool((var > 0).any()) else 1.0)
    return ts.float(), k_x.float(), k_d.float(), c.float(), var.float()


def ctrl_rollout(net: AdaptedDenoiser, schedule, objective: str, x: torch.Tensor, cond: torch.Tensor, steps: int,
                 constraints: Constraints | None = None, grad_from: int = 0, generator=None,
                 no_grad_early: bool = False):
    """K-step stochastic DDIM chain of the adapted model, with the reference on the same ``x_t``.

    ``x``: (B, H, D) start at t=1; ``cond``: (B, L). Returns ``(x0 (B, H, D), kl (B,))`` where
    ``kl = sum_i k_d_i^2 ||D_theta - D_ref||^2 / (2 c_i^2)`` over the entries not inpainted
    (``mu_theta - mu_ref = k_d (D_theta - D_ref)`` since both start from the same ``x_t``).
    The sample is detached before step ``grad_from`` (truncated backprop through the chain).

    ``no_grad_early`` (DRaFT-K): the steps before ``grad_from`` run under ``no_grad`` and skip the
    reference, except one of them drawn at random whose KL term (with its direct gradient, on its
    detached ``x_t``) counts ``grad_from`` times: an unbiased estimate of those steps' KL."""
    ts, k_x, k_d, c, var = ddpm_coefficients(schedule, steps, x.device)
    denoise = make_denoiser(net, schedule, objective, cond)
    reference = make_denoiser(net, schedule, objective, None)
    free = torch.ones_like(x[0], dtype=torch.bool)
    mask = fill = None
    if constraints is not None:
        mask, fill = constraints.dense(x)
        x = torch.where(mask, fill, x)
        free = ~mask
    kl = x.new_zeros(x.shape[0])
    kl_step = (int(torch.randint(0, grad_from, (1,), generator=generator))
               if no_grad_early and grad_from > 0 else None)
    for i in range(steps):
        if i <= grad_from:
            x = x.detach()
        t = ts[i].expand(x.shape[0])
        if kl_step is not None and i < grad_from:  # DRaFT-K: an early step, no gradient through the chain
            if i == kl_step:
                d = denoise(x, t)
                with torch.no_grad():
                    d_ref = reference(x, t)
                kl = kl + grad_from * k_d[i] ** 2 * ((d - d_ref) * free).pow(2).flatten(1).sum(1) / (2 * var[i])
                d = d.detach()
            else:
                with torch.no_grad():
                    d = denoise(x, t)
        else:
            d = denoise(x, t)
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= grad_from):
                d_ref = reference(x, t)
            kl = kl + k_d[i] ** 2 * ((d - d_ref) * free).pow(2).flatten(1).sum(1) / (2 * var[i])
        x = k_x[i] * x + k_d[i] * d
        if c[i] > 0:
            x = x + c[i] * randn(x.shape, generator, x.device, x.dtype)
        if mask is not None:
            x = torch.where(mask, fill, x)
    return x, kl


def ctrl_loss(net: AdaptedDenoiser, classifier: LabelClassifier, schedule, objective: str, x_T: torch.Tensor,
              y: torch.Tensor, n_labels: int, steps: int, alpha: float, constraints=None, truncate: bool = True,
              generator=None, grad_steps: int = 0, no_grad_early: bool = False, reward_temperature: float = 1.0):
    """``mean(-log p_hat(y | x0)) + alpha * mean(KL)`` of one K-step rollout; returns (loss, logs).

    ``grad_steps = k > 0``: backprop only through the last k steps (DRaFT-K, see ``ctrl_rollout``);
    otherwise through the chain from a random step on (``truncate``) or all of it. ``no_grad_early``
    runs the steps before that point as DRaFT-K does (implied by ``grad_steps``)."""
    if not 0 <= grad_steps <= steps:
        raise ValueError(f"grad_steps must be in [0, {steps}], got {grad_steps}")
    if grad_steps:
        grad_from = steps - grad_steps
    else:
        grad_from = int(torch.randint(0, steps, (1,), generator=generator)) if truncate else 0
    cond = F.one_hot(y, n_labels).to(x_T.dtype)
    x0, kl = ctrl_rollout(net, schedule, objective, x_T, cond, steps, constraints, grad_from, generator,
                          no_grad_early=no_grad_early or grad_steps > 0)
    logits = classifier.logits(x0)
    log_p = (logits / reward_temperature).log_softmax(-1).gather(1, y[:, None]).squeeze(1)
    loss = -log_p.mean() + alpha * kl.mean()
    acc = (logits.argmax(-1) == y).float().mean()
    return loss, {"log_p": log_p.mean().detach(), "kl": kl.mean().detach(), "classifier_acc": acc.detach()}


# ---------------------------------------------------------------------------------------------
# Labels

def maze_label_names(task: str) -> tuple[str, ...]:
    from diffplan.envs.maze import get_maze

    return tuple(f"r{r}c{c}" for r, c in get_maze(task).free_cells)


def end_cell_labels(task: str, xy: np.ndarray) -> np.ndarray:
    """Label (index into ``maze_label_names``) of the free cell containing each ``xy (..., 2)``;
    -1 for a wall cell."""
    from diffplan.envs.maze import get_maze

    maze = get_maze(task)
    table = np.full(maze.maze_map.size, -1, np.int64)
    free = maze.free_cells
    table[free[:, 0] * maze.shape[1] + free[:, 1]] = np.arange(len(free))
    return table[maze.cell_index(xy)]


def return_bucket_labels(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket of each return: ``searchsorted(edges, v)`` for inner quantile edges (n_buckets - 1,)."""
    return np.searchsorted(edges, np.asarray(values).reshape(-1), side="right").astype(np.int64)


# ---------------------------------------------------------------------------------------------
# The policy

@register_policy
class CTRLPlanner(PolicyBase):
    kind = "ctrl"
    Config = CTRLConfig

    def __init__(self, config: CTRLConfig, spec: SpaceSpec):
        super().__init__(config, spec)
        base = config.base
        if not config.label_names:
            raise ValueError("CTRLConfig.label_names is empty: build with CTRLPlanner.from_dataset")
        self.n_labels = len(config.label_names)
        self.obs_dim, self.act_dim = spec.obs_dim, spec.act_dim
        self.dim = spec.obs_dim + (spec.act_dim if base.with_actions else 0)
        self.plan_shape = (base.horizon, self.dim)
        self.schedule = SCHEDULES[base.schedule]()
        self.normalizer = (LimitsNormalizer if base.normalizer == "limits" else GaussianNormalizer)(self.dim)
        self.net = AdaptedDenoiser(TemporalUNet(self.dim, dim=base.dim, dim_mults=base.dim_mults), base.horizon,
                                   self.dim, self.n_labels, config.side_hidden, config.side_depth,
                                   config.label_lr_scale)
        self.classifier = LabelClassifier(base.horizon, self.dim, self.n_labels, config.classifier_hidden)
        self.classifier.requires_grad_(False)
        self.register_buffer("bucket_edges", torch.zeros(max(config.n_buckets - 1, 0)))
        self.register_buffer("label_freq", torch.full((self.n_labels,), 1.0 / self.n_labels))
        self._target = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_pretrained(cls, base: DiffuserPlanner, dataset, config: CTRLConfig, progress: bool = False
                        ) -> CTRLPlanner:
        """Adapter around ``base`` (copied, frozen) and a classifier fitted on ``dataset``'s windows."""
        if base.config.value_guided:
            raise ValueError("CTRL starts from a Diffuser without value guidance: pass base.unguided()")
        if base.spec.goal_dim and base.config.inpaint_goal and config.label_kind == "end_cell":
            import warnings

            warnings.warn("the base planner inpaints the goal: end_cell labels then only restate the goal")
        spec = base.spec
        config = dataclasses.replace(config, base=base.config)
        if config.label_kind == "end_cell":
            if not spec.task:
                raise ValueError("end_cell labels need a maze task")
            config.label_names = maze_label_names(spec.task)
        else:
            config.label_names = tuple(f"b{i}" for i in range(config.n_buckets - 1)) + ("top",)
        with torch.random.fork_rng(devices=[]):  # the classifier's and side net's init: same config, same weights
            torch.manual_seed(0)
            policy = cls(config, spec)
        policy.normalizer.load_state_dict(base.normalizer.state_dict())
        missing, unexpected = policy.net.net.load_state_dict(_adapted_keys(base.net.state_dict()), strict=False)
        if unexpected or missing != ["embed.weight"]:
            raise ValueError(f"base net does not fit the adapted net: missing {missing[:5]}, unexpected {unexpected[:5]}")
        x, y = policy._labelled_windows(dataset, config.classifier_windows, np.random.default_rng(0), fit=True)
        policy.label_freq.copy_(torch.bincount(y, minlength=policy.n_labels).float() / len(y))
        policy.classifier.requires_grad_(True)
        policy.classifier_report = fit_classifier(policy.classifier, x, y, steps=config.classifier_steps)
        policy.classifier.requires_grad_(False)
        return policy

    @classmethod
    def from_dataset(cls, dataset, config: CTRLConfig) -> CTRLPlanner:
        """For ``train_policy``: load the base from ``config.base_checkpoint``."""
        from diffplan.policies.base import load_policy

        if not config.base_checkpoint:
            raise ValueError("CTRLConfig.base_checkpoint must name the pretrained Diffuser checkpoint")
        base = load_policy(config.base_checkpoint)
        if not isinstance(base, DiffuserPlanner):
            raise TypeError(f"{config.base_checkpoint} holds a {base.kind!r} policy, CTRL needs a 'diffuser'")
        return cls.from_pretrained(base, dataset, config)

    def _windows(self, dataset) -> SequenceWindows:
        cfg = self.config.base
        keys = ("observations", "actions") if cfg.with_actions else ("observations",)
        pad_fn = rest_at_goal_pad if cfg.pad and dataset.goals is not None else None
        returns = self.config.label_kind == "return_bucket"
        episode = returns and self.config.return_kind == "episode"
        return SequenceWindows(dataset, cfg.horizon, keys=keys, pad=cfg.pad, pad_obs_fn=pad_fn,
                               value=returns and not episode, episode_return=episode, discount=cfg.discount)

    @staticmethod
    def _returns(b: dict) -> np.ndarray | None:
        """The returns a window batch is labelled by (``value`` or ``episode_return``), if any."""
        return b.get("value", b.get("episode_return"))

    def _labelled_windows(self, dataset, n: int, rng, fit: bool = False, episodes: bool = False):
        """``n`` normalized windows (n, H, D) and their labels (n,); with ``episodes``, also the index
        of the episode each window comes from (n,)."""
        windows = self._windows(dataset)
        idx = rng.integers(0, len(windows), size=min(n, len(windows)))
        b = windows.get_batch(idx)
        x = b["observations"]
        if self.config.base.with_actions:
            x = np.concatenate([x, b["actions"]], -1)
        if self.config.label_kind == "return_bucket" and fit:
            qs = np.linspace(0, 1, self.config.n_buckets + 1)[1:-1]
            self.bucket_edges.copy_(torch.as_tensor(np.quantile(self._returns(b).reshape(-1), qs), dtype=torch.float32))
        y = self.labels_of(x, self._returns(b))
        keep = y >= 0
        out = self.normalizer.normalize(torch.as_tensor(x[keep])), torch.as_tensor(y[keep])
        return (*out, np.asarray(windows.episode_of_window)[idx][keep]) if episodes else out

    def labels_of(self, x: np.ndarray, value: np.ndarray | None = None) -> np.ndarray:
        """True labels of raw (unnormalized) windows ``x (N, H, D)`` (and their returns ``value``)."""
        if self.config.label_kind == "end_cell":
            return end_cell_labels(self.spec.task, np.asarray(x)[:, -1, :2])
        return return_bucket_labels(value, self.bucket_edges.cpu().numpy())

    # ------------------------------------------------------------------ finetuning (Trainer)
    def training_target(self) -> int:
        """The label ``config.target`` asks for, as finetuning sees it (``label_sampling: target``):
        ``"goal"`` is the maze task's eval goal cell (the env's goal moves only within that cell)."""
        target = self.config.target
        if target == "goal":
            from diffplan.envs import get_task

            cell = get_task(self.spec.task).extras.get("goal_cell") if self.spec.task else None
            if self.config.label_kind != "end_cell" or cell is None:
                raise ValueError("label_sampling 'target' with target 'goal' needs a maze task with a fixed goal "
                                 "cell (end_cell labels); name the label instead, e.g. target: r1c1")
            from diffplan.envs.maze import get_maze

            xy = get_maze(self.spec.task).cell_to_xy(*cell)
            return int(end_cell_labels(self.spec.task, np.asarray(xy, dtype=np.float64)[None])[0])
        return int(self.target_labels(target, 1, None)[0])

    def batches(self, dataset, batch_size: int):
        windows = self._windows(dataset)
        sampling = self.config.label_sampling
        target = self.training_target() if sampling == "target" else None
        first_obs = np.asarray(dataset.observations)[dataset.episode_starts]  # reward tasks' rest starts

        def draw(n: int, rng: np.random.Generator):
            b = windows.sample(n, rng)
            x = b["observations"]
            if self.config.base.with_actions:
                x = np.concatenate([x, b["actions"]], -1)
            return x, self._returns(b)

        def reaching(n: int, rng: np.random.Generator) -> np.ndarray:
            """Starts (n, D) of data windows whose label is the target."""
            starts, have = [], 0
            for _ in range(100):
                x, value = draw(max(4 * n, 64), rng)
                x = x[self.labels_of(x, value) == target]
                starts.append(x[:, 0])
                have += len(x)
                if have >= n:
                    return np.concatenate(starts)[:n]
            raise ValueError(f"label {self.config.label_names[target]!r} is (almost) never reached in the data: "
                             "use target_starts 'any'")

        def sample_batch(step: int, rng: np.random.Generator) -> dict:
            x, value = draw(batch_size, rng)
            y = rng.integers(0, self.n_labels, batch_size) if sampling == "uniform" else self.labels_of(x, value)
            y = np.where(y < 0, rng.integers(0, self.n_labels, batch_size), y)
            start = x[:, 0]
            if target is not None:  # this fraction asks for the label the policy will be asked for
                ask = rng.random(batch_size) < self.config.target_fraction
                y = np.where(ask, target, y)
                start = start.copy()
                if self.config.target_starts == "reaching" and ask.any():
                    start[ask] = reaching(int(ask.sum()), rng)
                if self.config.rest_fraction > 0:
                    rest = ask & (rng.random(batch_size) < self.config.rest_fraction)
                    if self.config.label_kind == "end_cell":
                        start[rest, 2: self.obs_dim] = 0.0  # maze observations: (x, y, vx, vy)
                    else:
                        start[rest, : self.obs_dim] = first_obs[rng.integers(0, len(first_obs), int(rest.sum()))]
            return {"start": start[:, : self.obs_dim], "y": y}

        return sample_batch

    def loss(self, batch):
        start = batch["start"]
        x_T = torch.randn(start.shape[0], *self.plan_shape, device=start.device) * self.schedule.sigma(torch.ones(()))
        return ctrl_loss(self.net, self.classifier, self.schedule, self.config.base.objective, x_T,
                         batch["y"].long(), self.n_labels, self.config.finetune_steps or self.config.steps,
                         self.config.alpha,
                         self.constraints(start), self.config.truncate, grad_steps=self.config.grad_steps,
                         no_grad_early=self.config.no_grad_early, reward_temperature=self.config.reward_temperature)

    # ------------------------------------------------------------------ acting
    def set_target(self, target) -> None:
        """Requested label(s) for the next plans: a name, an index, ``"goal"``, or a list (one per env).
        ``None`` goes back to ``config.target``."""
        self._target = target

    def act(self, obs, budget_ms: float | None = None, target=None) -> np.ndarray:
        if target is not None:
            self.set_target(target)
        return super().act(obs, budget_ms)

    def target_labels(self, target, batch: int, goal: torch.Tensor | None) -> torch.Tensor:
        """Requested labels (B,) long. A float target is a return level: the bucket that holds it."""
        names = self.config.label_names
        if isinstance(target, (list, tuple, np.ndarray, torch.Tensor)) and not isinstance(target, str):
            labels = [int(self.target_labels(t, 1, None if goal is None else goal[i: i + 1])[0])
                      for i, t in enumerate(target)]
            if len(labels) != batch:
                raise ValueError(f"{len(labels)} targets for a batch of {batch} envs")
            return torch.tensor(labels, device=self.device)
        if target == "goal":
            if goal is None or self.config.label_kind != "end_cell":
                raise ValueError("target 'goal' needs a maze task (end_cell labels) and a desired_goal")
            y = end_cell_labels(self.spec.task, goal.cpu().numpy())
            if (y < 0).any():
                raise ValueError("desired_goal lies in a wall cell")
            return torch.as_tensor(y, device=self.device)
        if isinstance(target, float) or (isinstance(target, torch.Tensor) and target.is_floating_point()):
            if self.config.label_kind != "return_bucket":
                raise ValueError(f"a return level ({float(target)}) needs return_bucket labels; labels are "
                                 f"{', '.join(names)}")
            level = torch.full((batch,), float(target), device=self.device, dtype=self.bucket_edges.dtype)
            return torch.searchsorted(self.bucket_edges, level, right=True)  # as return_bucket_labels, no host copy
        if isinstance(target, str):
            if target not in names:
                raise ValueError(f"unknown target {target!r}; labels are {', '.join(names)} (or 'goal' for mazes)")
            target = names.index(target)
        if not 0 <= int(target) < self.n_labels:
            raise ValueError(f"target index {target} outside [0, {self.n_labels})")
        return torch.full((batch,), int(target), device=self.device, dtype=torch.long)

    def constraints(self, obs: torch.Tensor) -> Constraints:
        """The current state (B, obs_dim), normalized, at step 0 (the base never saw a goal)."""
        goal = None
        return plan_constraints(self.normalizer, obs, goal, self.config.base.horizon, self.obs_dim)

    @property
    def noise_samples(self) -> int:
        """Candidate plans per env (the classifier keeps the best): the runtime draws them all from
        the env's own noise generator."""
        return self.config.n_samples

    def plan(self, obs, goal, noise, *, warm=None, t_start=1.0, steps=None, labels=None, generator=None):
        """obs (B, obs_dim) raw, goal (B, goal_dim)|None, noise (B, H, D), or (B, n, H, D) with
        ``n_samples = n`` candidates -> normalized plans (B, H, D). The eta > 0 steps draw their
        noise from ``generator`` (one per env, or one)."""
        cfg = self.config
        steps = cfg.steps if steps is None else steps
        if labels is None:
            labels = self.target_labels(cfg.target if self._target is None else self._target, obs.shape[0], goal)
        n = cfg.n_samples
        if n > 1:  # n candidates per env, rows [g n, (g+1) n) of env g (its generator fills them: see randn)
            noise = candidate_noise(noise, n, generator)
            obs, labels = obs.repeat_interleave(n, 0), labels.repeat_interleave(n, 0)
            warm = None if warm is None else warm.repeat_interleave(n, 0)
        cond = F.one_hot(labels, self.n_labels).to(noise.dtype)
        a, s = noise_level(self.schedule, t_start)  # cached floats
        x_init = noise * s if warm is None else a * warm + s * noise
        objective = cfg.base.objective
        guidance = None
        if cfg.sampler == "ctrl":
            denoise = make_denoiser(self.net, self.schedule, objective, cond)
        else:
            denoise = make_denoiser(self.net, self.schedule, objective, None)
            if cfg.sampler == "classifier_guidance":
                guidance = ValueGuidance(lambda x, t: self.classifier.log_prob(x, labels.clone()), scale=cfg.guide_scale,
                                         n_guide_steps=cfg.n_guide_steps, t_stopgrad=0.0)
        plans = sample(denoise, x_init, schedule=self.schedule, solver="ddim", eta=cfg.eta, steps=steps,
                       t_start=t_start, constraints=self.constraints(obs), guidance=guidance, noise_prior=False,
                       generator=generator)
        if n > 1:
            score = self.classifier.log_prob(plans, labels).view(-1, n)
            plans = plans[score.argmax(1) + torch.arange(0, plans.shape[0], n, device=plans.device)]
        return plans

    def plan_states(self, plans: torch.Tensor) -> torch.Tensor:
        return self.normalizer.unnormalize(plans)[..., : self.obs_dim]

    def action_at(self, plans, index, obs, goal):
        base = self.config.base
        if base.action_mode == "plan":
            step = plans[torch.arange(plans.shape[0], device=plans.device), index.clamp(max=base.horizon - 1)]
            return self.normalizer.unnormalize(step)[:, self.obs_dim:]
        return pd_tracking(self.normalizer, plans, index, obs, self.obs_dim, self.act_dim, base.kp, base.kd)

    @torch.no_grad()
    def path_kl(self, obs: torch.Tensor, labels: torch.Tensor, n: int = 1) -> float:
        """Monte-Carlo path KL(p_theta(.|y) || p_pre) per plan, over ``n`` rollouts of each (obs, label)."""
        obs, labels = obs.repeat_interleave(n, 0), labels.repeat_interleave(n, 0)
        x_T = torch.randn(obs.shape[0], *self.plan_shape) * self.schedule.sigma(torch.ones(()))
        cond = F.one_hot(labels, self.n_labels).float()
        _, kl = ctrl_rollout(self.net, self.schedule, self.config.base.objective, x_T, cond, self.config.steps,
                             self.constraints(obs))
        return float(kl.mean())


def _adapted_keys(state: dict) -> dict:
    """A plain net's state dict under the adapted net's keys (``embed.*`` -> ``embed.base.*``)."""
    return {("embed.base." + k[len("embed."):] if k.startswith("embed.") else k): v for k, v in state.items()}


__all__ = ["AdaptedDenoiser", "CTRLConfig", "CTRLPlanner", "LabelClassifier", "LabelEmbedding", "ctrl_loss",
           "ctrl_rollout", "ddpm_coefficients", "end_cell_labels", "fit_classifier", "maze_label_names",
           "return_bucket_labels"]
