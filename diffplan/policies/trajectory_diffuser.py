"""Trajectory Diffuser: draft a plan autoregressively, then refine it with a few diffusion steps.

Follows "Diffusion Models as Optimizers for Efficient Planning in Offline RL" (Huang et al.,
ECCV 2024). The slow part of a diffusion planner is the chain of U-Net passes that turns noise
into a trajectory. Here a cheap causal sequence model writes a feasible draft first, and the
diffusion model only runs the last ``k`` steps of its chain, starting from that draft.

What it trains (one ``loss``, the three parts logged separately, one checkpoint)
    * Drafter: a causal transformer (:mod:`diffplan.nn.causal_transformer`). Its tokens are the
      states ``s_0, s_r, s_2r, ...`` after one conditioning token ``c``; the output at state
      token ``s_jr`` predicts the next ``r = draft_stride`` states as offsets from it (MSE in
      normalized space, teacher forcing). ``r = 1`` is the paper's one-token-per-step drafter;
      a larger stride drafts the same full-resolution horizon in ``(H-1)/r`` autoregressive
      steps, which is what makes drafting cheaper than a U-Net pass at batch 1 on a CPU.
      ``c`` is the goal for goal tasks (the position part of the window's last state, which is
      also what is inpainted at H-1) and the scaled return-to-go for reward tasks.
    * Refiner: Diffuser's temporal U-Net over normalized state windows, with Diffuser's
      inpainting (first state; last state for goal tasks) and the condition ``c`` given through
      classifier-free guidance: ``c`` is replaced by the null condition with probability
      ``cond_dropout`` during training (the paper drops the return with p = 0.5).
    * Inverse dynamics (Decision Diffuser): an MLP ``(s_t, s_t+1) -> a_t``. It learns from the
      recorded windows (``inverse_input: data``) or, once a refiner is trained and frozen, from
      the same windows after the refinement plans get (``inverse_input: refined``). The second
      matters where one step moves the state little: on hopper the normalized ``s_t+1 - s_t`` is
      about 0.2 RMS, so the 0.03-0.04 RMS a low-noise refinement leaves on ``s_1`` is a large
      error for an inverse model that has only seen exact pairs.

How it acts
    ``plan`` drafts ``H-1`` states from the current state with a KV cache, imposes the current
    state (and ``[goal, 0, ...]`` at H-1) on the draft, noises it to ``t_start`` and runs ``k``
    solver steps with the same constraints re-imposed every step. ``noise_draft: false`` is the
    reference code's variant, which feeds the un-noised draft into the last ``k`` reverse steps;
    on five of the six locomotion mixed datasets it scored higher (docs/ARCHITECTURE.md).
    ``k = 0`` returns the constrained draft. A warm start from the runtime (``warm=``) refines
    the shifted previous plan instead of a new draft. Actions come from PD tracking of the plan
    (``action_mode: pd``, Diffuser's maze controller) or from the inverse dynamics
    (``action_mode: inverse``, locomotion).

Guidance on the goal
    For goal tasks the goal is also imposed at H-1 by inpainting, so the U-Net's goal input looks
    redundant; measured on pointmaze-umaze it is not: guiding toward it (``guidance_w`` > 1) makes
    plans that reach the goal sooner (k=2, 50 episodes: w=0 90.7, w=1 95.4, w=2 99.0, w=3 99.5).
    ``guidance_w = 1`` (the default) runs the conditional model alone, one network evaluation per
    step; ``guidance_w != 1`` runs ``null + w (cond - null)`` as one batch of two (at batch 1 on a
    CPU that costs about 2.4 single passes).

Guidance distillation
    ``distill_from: <checkpoint>`` (Meng et al. 2023, "On Distillation of Guided Diffusion Models",
    stage one at a fixed weight) gets the guided plan from one conditional pass: the refiner starts
    as a copy of the checkpoint's refiner, which stays frozen as the teacher, and is trained on the
    refiner's own inputs (windows noised to ``t <= train_t_max``, inpainted) so that its output at
    the condition is the teacher's ``null + distill_w (cond - null)`` and its output at the null
    condition is the teacher's null output. Plan with ``guidance_w: 1`` then. The teacher is not
    part of the saved checkpoint; the drafter and inverse dynamics train alongside as usual
    (``train_parts``), e.g. a new, cheaper drafter in the same run.

Cost of a plan
    The noise level's ``alpha, sigma`` are cached floats (``noise_level``) and ``sample`` adds no
    per-step work, so a ``k = 1`` plan costs a draft, one U-Net pass and a few small tensor ops. A draft costs ``ceil((H-1)/draft_stride)`` one-token transformer passes,
    mostly per-op overhead at batch 1 on a CPU: fewer tokens (a larger stride) and fewer blocks are
    what make it cheap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffplan.config import ConfigError
from diffplan.data import (
    GaussianNormalizer,
    LimitsNormalizer,
    SequenceWindows,
    discounted_returns,
)
from diffplan.diffusion import (
    cfg_denoiser,
    diffusion_loss,
    make_denoiser,
    noise_level,
    noise_to,
    sample,
)
from diffplan.nn import TemporalUNet
from diffplan.nn.causal_transformer import CausalTransformer, CausalTransformerConfig
from diffplan.policies.base import PolicyBase, SpaceSpec, register_policy
from diffplan.policies.diffuser import (
    SCHEDULES,
    candidate_noise,
    check_tracking,
    goal_rest_states,
    pd_tracking,
    plan_constraints,
    rest_at_goal_pad,
    window_constraints,
)
from diffplan.runtime.planner import PlannerConfig

PART_MODULES = {"drafter": "drafter", "refiner": "net", "inverse": "inverse"}  # part -> attribute
PARTS = tuple(PART_MODULES)


@dataclass
class TrajectoryDiffuserConfig:
    horizon: int = 128  # states in a plan
    plan_stride: int = 1  # env steps between plan states (keypoint plans; action_mode pd only)
    # refiner: Diffuser's U-Net over states
    dim: int = 32
    dim_mults: tuple[int, ...] = (1, 2, 4)
    schedule: str = "vp_cosine"
    objective: str = "x0"
    solver: str = "ddim"
    refine_steps: int = 5  # k: solver steps that refine a draft
    t_start: float = 0.5  # noise level the draft is noised to (or, un-noised, entered at)
    noise_draft: bool = True  # False: the reference code's variant (refine the un-noised draft)
    cond_dropout: float = 0.25  # classifier-free guidance: p of training with the null condition
    train_t_max: float = 1.0  # refiner trained on t ~ U(0, train_t_max); < 1 only for truncated use
    guidance_w: float = 1.0  # CFG weight at inference; 1: conditional model only, 0: unconditional
    # drafter: causal transformer
    draft_width: int = 128
    draft_depth: int = 2
    draft_heads: int = 4
    draft_stride: int = 1  # states predicted per drafter token (1: the paper's drafter)
    draft_weight: float = 1.0  # loss weights of the drafter and the inverse dynamics
    inverse_weight: float = 1.0
    inverse_hidden: int = 256
    inverse_pairs: int = 16  # (s_t, s_t+1) pairs drawn per training window for the inverse dynamics
    # what the inverse dynamics learns from: "data" (recorded windows, Decision Diffuser) or
    # "refined" (the same windows passed through this policy's frozen refinement first, as plans are)
    inverse_input: str = "data"
    # the refinement "refined" applies to the training windows; None: the plan's (t_start, noise_draft).
    # A noised refinement here with an un-noised one at plan time is hopper-medium-expert's setting:
    # the noise keeps the inverse dynamics from relying on details that drafts do not have
    inverse_t_start: float | None = None
    inverse_noise_draft: bool | None = None
    # data and conditioning
    normalizer: str = "limits"  # "limits" (mazes) or "gaussian" (locomotion)
    pad: bool = True  # windows past an episode end (mazes: rest at [goal, 0, ...])
    discount: float = 0.99  # of the return-to-go condition (reward tasks)
    target_return: float | None = None  # RTG to condition on; None: 0.9 x the dataset's max
    # actions
    action_mode: str = "pd"  # "pd" (maze tracking) | "inverse" (inverse dynamics)
    kp: float = 1.0
    kd: float = 1.0
    track_speed: float = 1.0  # PD tracking runs through the plan this many times faster than planned
    # training
    train_parts: tuple[str, ...] = PARTS  # parts whose loss is trained; others stay frozen
    init_from: str | None = None  # checkpoint whose weights give the parts not in train_parts
    # guidance distillation (Meng et al. 2023): the refiner starts as a copy of this checkpoint's
    # refiner (frozen, the teacher) and learns to output, at its condition, the teacher's CFG output
    # null + distill_w (cond - null); at the null condition, the teacher's null output
    distill_from: str | None = None
    distill_w: float = 3.0
    # a trained Diffuser checkpoint (same data, horizon, stride, U-Net, schedule, objective) whose
    # U-Net becomes the refiner, frozen and unconditional (the goal is imposed by inpainting alone):
    # only the drafter is trained, and TD and Diffuser then differ by the draft alone
    refiner_from: str | None = None
    # candidate plans, as the reference code's 32 batched drafts scored by a learned Q: each env's draft
    # is refined n_candidates times with different noise (always noised: the draft itself is
    # deterministic) and the plan whose first action (as executed) has the highest Q of `critic` (a
    # `kind: critic` checkpoint, or `use_critic(...)`) is kept; 1: one plan, no critic
    n_candidates: int = 1
    critic: str | None = None
    runtime: PlannerConfig = field(default_factory=lambda: PlannerConfig(n_action_steps=100_000))

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} unknown; choose from {sorted(SCHEDULES)}")
        if self.action_mode not in ("pd", "inverse"):
            raise ValueError(f"action_mode must be 'pd' or 'inverse', got {self.action_mode!r}")
        if self.normalizer not in ("limits", "gaussian"):
            raise ValueError(f"normalizer must be 'limits' or 'gaussian', got {self.normalizer!r}")
        if self.refine_steps < 0 or self.draft_stride < 1 or self.horizon < 2:
            raise ValueError("need refine_steps >= 0, draft_stride >= 1 and horizon >= 2")
        check_tracking(self.plan_stride, self.track_speed, self.action_mode)
        if not 0.0 < self.t_start <= 1.0:
            raise ValueError(f"t_start must be in (0, 1], got {self.t_start}")
        if self.n_candidates < 1:
            raise ValueError(f"n_candidates must be >= 1, got {self.n_candidates}")
        if self.inverse_t_start is not None and not 0.0 < self.inverse_t_start <= 1.0:
            raise ValueError(f"inverse_t_start must be in (0, 1] or null, got {self.inverse_t_start}")
        if not 0.0 < self.train_t_max <= 1.0:
            raise ValueError(f"train_t_max must be in (0, 1], got {self.train_t_max}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        self.train_parts = tuple(self.train_parts)
        unknown = sorted(set(self.train_parts) - set(PARTS))
        if unknown or not self.train_parts:
            raise ValueError(f"train_parts must be a non-empty subset of {PARTS}, got {self.train_parts}")
        if self.distill_from and "refiner" not in self.train_parts:
            raise ValueError("distill_from trains the refiner: add 'refiner' to train_parts")
        if not math.isfinite(self.distill_w) or self.distill_w < 0:
            raise ValueError(f"distill_w must be a finite number >= 0, got {self.distill_w}")
        if self.inverse_input not in ("data", "refined"):
            raise ValueError(f"inverse_input must be 'data' or 'refined', got {self.inverse_input!r}")
        if self.refiner_from and ("refiner" in self.train_parts or self.distill_from):
            raise ValueError("refiner_from gives a frozen refiner: drop 'refiner' from train_parts and distill_from")
        if self.inverse_input == "refined" and "refiner" in self.train_parts:
            raise ValueError("inverse_input: refined needs a trained, frozen refiner: train the refiner first, "
                             "then the inverse dynamics alone (train_parts: [inverse], init_from: <that checkpoint>)")


class InverseDynamics(nn.Module):
    """``(s_t, s_t+1) -> a_t`` in normalized units (Decision Diffuser: hidden 256-256)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * obs_dim, hidden), nn.Mish(), nn.Linear(hidden, hidden), nn.Mish(),
                                 nn.Linear(hidden, act_dim))

    def forward(self, s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([s, s_next], -1))


@register_policy
class TrajectoryDiffuser(PolicyBase):
    kind = "trajectory_diffuser"
    Config = TrajectoryDiffuserConfig
    steps_field = "refine_steps"
    min_steps = 0  # the draft alone

    def __init__(self, config: TrajectoryDiffuserConfig, spec: SpaceSpec):
        super().__init__(config, spec)
        h, d, r = config.horizon, spec.obs_dim, config.draft_stride
        self.obs_dim = self.dim = d
        self.goal_task = bool(spec.goal_dim)
        self.cond_dim = spec.goal_dim if self.goal_task else 1
        self.plan_shape = (h, d)
        self.schedule = SCHEDULES[config.schedule]()
        norm = LimitsNormalizer if config.normalizer == "limits" else GaussianNormalizer
        self.normalizer = norm(d)
        self.action_normalizer = LimitsNormalizer(spec.act_dim)
        self.register_buffer("return_scale", torch.ones(()))  # RTG condition = rtg / return_scale
        self.register_buffer("default_return", torch.ones(()))  # 0.9 x dataset max, in scaled units
        self.draft_tokens = math.ceil((h - 1) / r)
        self.drafter = CausalTransformer(CausalTransformerConfig(
            in_dim=d, out_dim=r * d, cond_dim=self.cond_dim, max_len=self.draft_tokens + 1,
            width=config.draft_width, depth=config.draft_depth, heads=config.draft_heads))
        # the U-Net's condition is [c, 1]; the null condition is all zeros (none: a Diffuser's U-Net)
        self.net = TemporalUNet(d, dim=config.dim, dim_mults=config.dim_mults,
                                cond_dim=0 if config.refiner_from else self.cond_dim + 1)
        self.inverse = InverseDynamics(d, spec.act_dim, config.inverse_hidden)

    # ------------------------------------------------------------------ training
    @classmethod
    def from_dataset(cls, dataset, config: TrajectoryDiffuserConfig) -> TrajectoryDiffuser:
        policy = cls(config, SpaceSpec.from_dataset(dataset))
        rows = [dataset.observations]
        if config.pad and dataset.goals is not None:  # padded rows [goal, 0, ...] are data too
            rows.append(goal_rest_states(dataset.goals, policy.dim))
        policy.normalizer.fit(np.concatenate(rows, 0))
        policy.action_normalizer.fit(np.concatenate([dataset.actions, np.asarray(
            [policy.spec.action_low, policy.spec.action_high], np.float32)], 0))
        if not policy.goal_task:
            rtg = discounted_returns(dataset.rewards, dataset.episode_ends, config.discount)
            policy.return_scale.fill_(float(np.abs(rtg).max()) or 1.0)
            policy.default_return.fill_(0.9 * float(rtg.max()) / float(policy.return_scale))
        if config.init_from:
            policy.load_weights(config.init_from, skip=config.train_parts)
        if config.refiner_from:
            policy.load_refiner(config.refiner_from)
        if config.distill_from:
            policy.load_teacher(config.distill_from)
        for part in set(PARTS) - set(config.train_parts):
            getattr(policy, PART_MODULES[part]).requires_grad_(False)
        return policy

    def load_weights(self, path, skip: tuple[str, ...] = ()) -> None:
        """Copy another checkpoint's weights, except those of the parts in ``skip`` (which may
        then differ in shape, e.g. a drafter with another stride trained against a fixed refiner)."""
        from diffplan.train.checkpoint import load_checkpoint

        prefixes = tuple(PART_MODULES[p] + "." for p in skip)
        state = {k: v for k, v in load_checkpoint(Path(path), resume_state=False).model_state.items() if not k.startswith(prefixes)}
        own = {k for k in self.state_dict() if not k.startswith(prefixes)}
        missing, unexpected = own - set(state), set(state) - own
        if missing or unexpected:
            raise ValueError(f"init_from {path}: weights do not fit this policy (missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]})")
        self.load_state_dict(state, strict=False)

    def load_refiner(self, path) -> None:
        """Take a trained Diffuser's U-Net as the (unconditional, frozen) refiner. The Diffuser
        must plan the same windows: same normalizer, horizon, stride, U-Net, schedule, objective."""
        from diffplan.train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(Path(path), resume_state=False)
        theirs = ckpt.config.get("policy", {}) if isinstance(ckpt.config, dict) else {}
        for key in ("horizon", "plan_stride", "dim", "dim_mults", "schedule", "objective"):
            mine, other = getattr(self.config, key), theirs.get(key, 1 if key == "plan_stride" else None)
            if (list(mine) if isinstance(mine, tuple) else mine) != other:
                raise ValueError(f"refiner_from {path}: its {key} is {other!r}, this policy's is {mine!r}")
        self._load_unet(self.net, ckpt.model_state, f"refiner_from {path}", ("normalizer",))

    def load_teacher(self, path) -> None:
        """Guidance distillation: a frozen copy of ``path``'s refiner becomes the teacher, and this
        policy's refiner starts from the same weights. The teacher is kept out of ``state_dict``
        (it is not saved with the student); it must have been trained on the same data (same
        normalizer) with the same U-Net shape."""
        from diffplan.train.checkpoint import load_checkpoint

        state = load_checkpoint(Path(path), resume_state=False).model_state
        teacher = TemporalUNet(self.dim, dim=self.config.dim, dim_mults=self.config.dim_mults,
                               cond_dim=self.cond_dim + 1)
        # same data, same units of x and of the condition
        self._load_unet(teacher, state, f"distill_from {path}", ("normalizer", "return_scale"))
        self.net.load_state_dict(teacher.state_dict())
        self.__dict__["_teacher"] = teacher.eval().requires_grad_(False)  # not a submodule: not saved

    def _load_unet(self, unet: nn.Module, state: dict, where: str, same: tuple[str, ...]) -> None:
        """Load another checkpoint's ``net.*`` into ``unet``, after checking that its buffers
        starting with ``same`` equal this policy's (it was fitted to the same data)."""
        own = self.state_dict()
        for k in (k for k in own if k.startswith(same)):
            if k not in state or not torch.equal(state[k].to(own[k]), own[k]):
                raise ValueError(f"{where}: it was fitted to other data ({k} differs)")
        try:
            unet.load_state_dict({k[len("net."):]: v for k, v in state.items() if k.startswith("net.")})
        except RuntimeError as e:
            raise ValueError(f"{where}: its U-Net does not fit this one (dim {self.config.dim}, "
                             f"dim_mults {self.config.dim_mults}): {e}") from None

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen refiner being distilled from (set by ``load_teacher``), or None."""
        return self.__dict__.get("_teacher")

    def batches(self, dataset, batch_size: int):
        cfg = self.config
        windows = SequenceWindows(dataset, cfg.horizon, keys=("observations", "actions"), pad=cfg.pad,
                                  pad_obs_fn=rest_at_goal_pad if cfg.pad and dataset.goals is not None else None,
                                  returns_to_go=not self.goal_task, discount=cfg.discount,
                                  stride=cfg.plan_stride)

        def sample_batch(step: int, rng: np.random.Generator) -> dict:
            b = windows.sample(batch_size, rng)
            out = {"x": b["observations"], "actions": b["actions"], "mask": b["mask"]}
            if "returns_to_go" in b:
                out["rtg"] = b["returns_to_go"][:, 0]
            return out

        return sample_batch

    def loss(self, batch):
        """Refiner (denoising) + drafter (next-state MSE) + inverse dynamics (action MSE)."""
        cfg = self.config
        x0 = self.normalizer.normalize(batch["x"])
        cond = self._train_condition(x0, batch)
        total, logs = x0.new_zeros(()), {}
        if "refiner" in cfg.train_parts:
            keep = (torch.rand(x0.shape[0], 1, device=x0.device) >= cfg.cond_dropout).to(x0.dtype)
            net_cond = self._net_cond(cond) * keep  # dropped rows get the null condition (zeros)
            t = torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype) * cfg.train_t_max
            constraints = window_constraints(x0, self.obs_dim, self.goal_task)
            if cfg.distill_from:
                loss = self._distill_loss(x0, t, self._net_cond(cond), keep, constraints)
            else:
                loss = diffusion_loss(self.net, x0, self.schedule, objective=cfg.objective, cond=net_cond, t=t,
                                      constraints=constraints)
            logs["refiner"] = loss.detach()
            total = total + loss
        if "drafter" in cfg.train_parts:
            loss = self._draft_loss(x0, cond)
            logs["drafter"] = loss.detach()
            total = total + cfg.draft_weight * loss
        if "inverse" in cfg.train_parts:
            b, h = x0.shape[:2]  # a few random pairs per window: neighbouring pairs are near-duplicates
            i = torch.randint(0, h - 1, (b, min(cfg.inverse_pairs, h - 1)), device=x0.device)
            rows = torch.arange(b, device=x0.device)[:, None]
            a = self.action_normalizer.normalize(batch["actions"][rows, i])
            both_real = batch["mask"][rows, i + 1]  # (s_t, s_t+1) both recorded, not padding
            s = self.refined_windows(x0, cond) if cfg.inverse_input == "refined" else x0
            err = (self.inverse(s[rows, i], s[rows, i + 1]) - a).pow(2).mean(-1)
            loss = (err * both_real).sum() / both_real.sum().clamp(min=1)
            logs["inverse"] = loss.detach()
            total = total + cfg.inverse_weight * loss
        return total, logs

    @torch.no_grad()
    def refined_windows(self, x0n: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Normalized data windows after a plan's refinement (``refine_steps`` from
        ``inverse_t_start``, noised first unless ``inverse_noise_draft`` is off; each defaults to
        the plan's ``t_start`` / ``noise_draft``), with the window's own start (and goal) imposed:
        what ``inverse_input: refined`` trains the inverse dynamics on."""
        cfg = self.config
        t_start = cfg.t_start if cfg.inverse_t_start is None else cfg.inverse_t_start
        noised = cfg.noise_draft if cfg.inverse_noise_draft is None else cfg.inverse_noise_draft
        return self.refine(x0n, cond, window_constraints(x0n, self.obs_dim, self.goal_task), torch.randn_like(x0n),
                           t_start=t_start, steps=cfg.refine_steps, noised=noised)

    def _distill_loss(self, x0n, t, net_cond, keep, constraints) -> torch.Tensor:
        """Guidance distillation (Meng et al. 2023, stage one at a fixed w): on the refiner's own
        training inputs (noised windows, inpainted), the student's output at the condition
        matches the teacher's ``null + w (cond - null)``; rows whose condition was dropped
        (``keep`` = 0) match the teacher's null output, so the student stays a CFG model.
        Compared in the network's output space (for any objective, CFG is affine there)."""
        teacher = self.teacher
        if teacher is None:
            raise RuntimeError(f"distill_from is set but no teacher is loaded: build the policy with "
                               f"from_dataset or call load_teacher({self.config.distill_from!r})")
        teacher.to(x0n.device)
        eps = torch.randn_like(x0n)
        x_t = noise_to(x0n, t, self.schedule, eps=eps)
        mask, fill = constraints.dense(x_t)
        x_t = torch.where(mask, fill, x_t)
        with torch.no_grad():
            both = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                           torch.cat([net_cond, torch.zeros_like(net_cond)]))
            d_cond, d_null = both.float().chunk(2)
            target = torch.where(keep[:, :, None] > 0, torch.lerp(d_null, d_cond, self.config.distill_w), d_null)
        err = (self.net(x_t, t, net_cond * keep) - target.to(x_t.dtype)) ** 2
        return err.masked_fill(mask, 0.0).mean()

    def _train_condition(self, x0n: torch.Tensor, batch) -> torch.Tensor:
        """(B, cond_dim): the window's end position (goal tasks) or its scaled first-step RTG."""
        if self.goal_task:
            return x0n[:, -1, : self.cond_dim]
        return (batch["rtg"].reshape(-1, 1) / self.return_scale).to(x0n.dtype)

    def _draft_loss(self, x0n: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, h, d = x0n.shape
        r, n = self.config.draft_stride, self.draft_tokens
        x = torch.cat([x0n, x0n[:, -1:].expand(b, 1 + n * r - h, d)], 1)  # to 1 + n r steps
        keys = x[:, 0: n * r: r]  # (B, n, D): s_0, s_r, ...
        pred = keys[:, :, None] + self.drafter(keys, cond).view(b, n, r, d)
        err = (pred.reshape(b, n * r, d) - x[:, 1:]).pow(2).mean(-1)
        return err[:, : h - 1].mean()  # steps past H-1 are not part of the plan

    # ------------------------------------------------------------------ planning
    def condition(self, obs: torch.Tensor, goal: torch.Tensor | None) -> torch.Tensor:
        """(B, cond_dim) at plan time: the normalized goal, or the target return (scaled)."""
        if self.goal_task:
            if goal is None:
                raise ValueError("this TrajectoryDiffuser was trained on a goal task: plan needs goal (B, goal_dim)")
            rest = torch.zeros(goal.shape[0], self.dim, device=goal.device, dtype=goal.dtype)
            rest[:, : goal.shape[1]] = goal
            return self.normalizer.normalize(rest)[:, : self.cond_dim]
        target = self.config.target_return
        value = self.default_return if target is None else torch.tensor(target / self.return_scale.item())
        return value.to(obs.device, obs.dtype).expand(obs.shape[0], 1)

    def _net_cond(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.cat([cond, torch.ones_like(cond[:, :1])], 1)

    def constraints(self, obs: torch.Tensor, goal: torch.Tensor | None):
        """Diffuser's plan-time inpainting: current state at 0, ``[goal, 0, ...]`` at H-1."""
        return plan_constraints(self.normalizer, obs, goal, self.config.horizon, self.obs_dim)

    @torch.no_grad()
    def draft(self, obs: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Autoregressive draft with a KV cache: obs (B, obs_dim) raw, cond (B, cond_dim) ->
        normalized states (B, H, D), ``ceil((H-1)/stride)`` one-token transformer passes."""
        b, d, r = obs.shape[0], self.dim, self.config.draft_stride
        s0 = self.normalizer.normalize(obs)[:, None]
        cache = self.drafter.new_cache(b, obs.device, obs.dtype)
        key, states = s0, [s0]
        for j in range(self.draft_tokens):
            chunk = key + self.drafter(key, cond if j == 0 else None, cache=cache).view(b, r, d)
            states.append(chunk)
            key = chunk[:, -1:]
        return torch.cat(states, 1)[:, : self.config.horizon]

    def denoiser(self, cond: torch.Tensor):
        """``denoise(x_t, t) -> x0`` of the refiner under classifier-free guidance weight w."""
        cfg = self.config
        if cfg.refiner_from:  # an unconditional Diffuser U-Net: the goal is inpainted, not input
            return make_denoiser(self.inference_net(), self.schedule, cfg.objective)
        net_cond = self._net_cond(cond)
        if cfg.guidance_w == 1.0:  # the conditional model alone: one network evaluation per step
            return make_denoiser(self.inference_net(), self.schedule, cfg.objective, cond=net_cond)
        if cfg.guidance_w == 0.0:
            return make_denoiser(self.inference_net(), self.schedule, cfg.objective, cond=torch.zeros_like(net_cond))

        def denoise_cond(x, t, c):
            return make_denoiser(self.inference_net(), self.schedule, cfg.objective, cond=c)(x, t)

        return cfg_denoiser(denoise_cond, net_cond, torch.zeros_like(net_cond), cfg.guidance_w)

    def plan(self, obs, goal, noise, *, warm=None, t_start=None, steps=None, generator=None):
        """obs (B, obs_dim) raw, goal (B, goal_dim)|None, noise (B, H, D) standard normal ->
        normalized plans (B, H, D).

        Cold: draft, then refine ``steps`` (default ``refine_steps``) solver steps from
        ``t_start`` (default the config's). Warm (``warm``: the shifted previous plan): refine
        it instead of a draft. ``steps=0`` returns the constrained draft (or warm plan)."""
        cfg = self.config
        if tuple(noise.shape[-2:]) != self.plan_shape:
            raise ValueError(f"noise must have shape (B, {self.plan_shape[0]}, {self.plan_shape[1]}), got {tuple(noise.shape)}")
        steps = cfg.refine_steps if steps is None else steps
        t_start = cfg.t_start if t_start is None else float(t_start)
        if steps < 0 or not 0.0 < t_start <= 1.0:
            raise ValueError(f"need steps >= 0 and 0 < t_start <= 1, got steps={steps}, t_start={t_start}")
        cond = self.condition(obs, goal)
        constraints = self.constraints(obs, goal)
        x = constraints.apply(self.draft(obs, cond) if warm is None else warm)
        n = self.noise_samples
        if n == 1:
            return self.refine(x, cond, constraints, noise, t_start=t_start, steps=steps,
                               noised=cfg.noise_draft or warm is not None, generator=generator)
        critic = self.reranker()
        if critic is None:
            raise ConfigError(f"n_candidates: {n} needs a critic to pick among them (critic: <checkpoint>)")
        from diffplan.policies.critic import best_candidates

        def rep(v):
            return None if v is None else v.repeat_interleave(n, 0)

        goal_n = rep(goal)  # each env's draft, refined n times with different noise
        plans = self.refine(rep(x), rep(cond), self.constraints(rep(obs), goal_n), candidate_noise(noise, n, generator),
                            t_start=t_start, steps=steps, noised=True, generator=generator)
        return best_candidates(self, critic, plans, obs, goal_n)

    @property
    def noise_samples(self) -> int:
        """Candidate plans per env (``n_candidates``): the runtime draws their noise from each
        env's own generator."""
        return self.config.n_candidates

    def refine(self, x, cond, constraints, noise, *, t_start: float, steps: int, noised: bool = True,
               generator=None):
        """``steps`` solver steps on the normalized trajectories ``x`` (B, H, D), constrained, from
        ``t_start``: ``x`` is noised to ``t_start`` first when ``noised`` (replaced by noise at
        ``t_start = 1``). ``steps = 0`` returns ``x``."""
        if steps == 0:
            return x
        alpha, sigma = noise_level(self.schedule, t_start)
        if t_start >= 1.0:  # a full chain: start from pure noise, as a cold Diffuser plan does
            x = sigma * noise
        elif noised:
            x = torch.add(alpha * x, noise, alpha=sigma)
        return sample(self.denoiser(cond), x, schedule=self.schedule, solver=self.config.solver, steps=steps,
                      t_start=t_start, constraints=constraints, noise_prior=False, generator=generator)

    def plan_states(self, plans: torch.Tensor) -> torch.Tensor:
        """Unnormalized states (B, H, obs_dim) of normalized plans, e.g. for plots."""
        return self.normalizer.unnormalize(plans)

    @property
    def plan_stride(self) -> int:
        """Env steps between plan states (the runtime shifts warm starts by executed // stride)."""
        return self.config.plan_stride

    def action_at(self, plans, index, obs, goal):
        if self.config.action_mode == "pd":
            return pd_tracking(self.normalizer, plans, index, obs, self.obs_dim, self.spec.act_dim,
                               self.config.kp, self.config.kd, self.config.plan_stride,
                               self.config.track_speed)
        nxt = (index + 1).clamp(max=self.config.horizon - 1)
        target = plans[torch.arange(plans.shape[0], device=plans.device), nxt]
        a = self.inverse(self.normalizer.normalize(obs), target)
        return self.action_normalizer.unnormalize(a)
