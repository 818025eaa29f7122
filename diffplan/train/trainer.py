"""The shared training loop: any module with a ``loss(batch)`` trains here.

AdamW with linear warmup then cosine (or constant) learning rate, gradient clipping, EMA, bf16
autocast on CUDA, tqdm + TensorBoard + CSV logs, atomic checkpoints with exact resume, and
DistributedDataParallel under ``torchrun``.

Determinism: step ``s`` on rank ``r`` draws its batch with ``numpy.random.default_rng([seed, s, r])``
and reseeds torch from the same triple, so the whole run is a function of ``(seed, step, rank)``.
A resumed run replays the uninterrupted one bit for bit (on CPU), and DDP ranks see different
shards without a sampler.

CUDA graphs (``TrainConfig.cuda_graph``): after ``GRAPH_WARMUP`` eager steps on a side stream, the
whole update (forward, backward, clipping, the optimizer step; with a device-side sampler the
batch draw too) is captured once and replayed every step. Host batches are copied into its static
input buffers; the learning rate is a device tensor the schedule fills; torch's generator is
reseeded per step as in the eager loop (a replay reads the generator's seed), so a captured run is
a function of its seed too, though not bitwise the eager run. EMA and logging stay eager. A
batch sampler marked ``device_side`` (e.g. ``DeviceWindows``) draws its batch on the device from
torch's generator, so nothing is copied from the host. Elsewhere (CPU, DDP) the loop runs eagerly.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffplan.config import ConfigError, check_fields, from_dict
from diffplan.train import distributed as dist_
from diffplan.train.checkpoint import (
    CHECKPOINTS_SUBDIR,
    OPTIMIZER_FILE,
    CheckpointError,
    check_shapes,
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    recover_checkpoints,
    save_checkpoint,
    step_dir_name,
)

__all__ = ["Batches", "EagerStepCapture", "TrainConfig", "Trainer", "learning_rate"]

# (step, rng) -> batch. rng is numpy.random.default_rng([seed, step, rank]).
Batches = Callable[[int, np.random.Generator], Mapping[str, Any]]

_TRAINER_STATE_FORMAT = "diffplan.trainer/1"
GRAPH_WARMUP = 3  # eager steps before the capture (optimizer state, cuBLAS workspaces), as torch's docs ask


@dataclass
class TrainConfig:
    steps: int = 100_000
    batch_size: int = 32  # per process; read by the caller's `batches` function, not by the loop
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 500
    lr_schedule: str = "cosine"  # "cosine" | "constant" after warmup
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float | None = 1.0  # max global grad norm; None: no clipping
    ema_decay: float = 0.995
    ema_every: int = 1
    seed: int = 0  # data order, per-step randomness and (in train_policy) network initialization
    log_every: int = 100
    ckpt_every: int = 5000
    keep_last: int = 2  # step-* folders kept; 0 keeps all
    bf16: bool = True  # bf16 autocast on CUDA; ignored on CPU
    device: str = "cpu"
    progress: bool = True
    ddp_find_unused: bool = False  # DDP find_unused_parameters, for losses that skip some params
    cuda_graph: bool = False  # capture the update in a CUDA graph and replay it (single-process CUDA)
    data_on_device: bool = False  # gather batches on the training device (policies whose sampler supports it)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(
                f"TrainConfig.lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}"
            )
        for name in ("warmup_steps", "seed", "keep_last", "weight_decay", "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("steps", "batch_size", "ema_every", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "grad_clip"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError(f"TrainConfig.ema_decay must be in [0, 1], got {self.ema_decay}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        return from_dict(cls, dict(d), "train")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


def learning_rate(step: int, config: TrainConfig, base_lr: float | None = None) -> float:
    """LR for the update made at ``step`` (0-based): linear warmup to ``base_lr``, then cosine to
    ``min_lr_ratio * base_lr`` at ``config.steps`` (or constant). Warmup starts at base_lr/warmup,
    not 0, so the first update is not wasted."""
    base = config.lr if base_lr is None else base_lr
    if step < config.warmup_steps:
        return base * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return base
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    floor = config.min_lr_ratio * base
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _torch_seed(seed: int, step: int, rank: int) -> int:
    # A separate SeedSequence stream (the trailing 1) from the data rng default_rng([seed, step, rank]).
    state = np.random.SeedSequence([seed, step, rank, 1]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------------------
# EMA: diffplan.nn.ema.EMA when it exists (EMA(model, decay), update(), state_dict(),
# load_state_dict(), copy_to(model)); a minimal stand-in with the same interface otherwise.


class _FallbackEMA:
    def __init__(self, model: nn.Module, decay: float):
        self.model = model
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, Tensor)}

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        for k, v in self.model.state_dict().items():
            if k not in self.shadow:
                continue
            s = self.shadow[k]
            if s.is_floating_point():
                s.lerp_(v.detach(), 1.0 - self.decay)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": dict(self.shadow),
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow, strict=False)


def _ema_class() -> type:
    if importlib.util.find_spec("diffplan.nn.ema") is not None:
        from diffplan.nn.ema import EMA

        return EMA
    return _FallbackEMA


# ----------------------------------------------------------------------------------------------


class _LossForward(nn.Module):
    """DDP hooks `forward`; the model exposes `loss`, so forward calls it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.model.loss(batch)


class Trainer:
    """Train ``model`` (any ``nn.Module`` with ``loss(batch) -> loss | (loss, logs)``).

    ``batches(step, rng)`` returns a dict of numpy arrays or tensors; it is called with
    ``rng = numpy.random.default_rng([config.seed, step, rank])``. ``run_config`` is written as
    ``config.yaml`` into every checkpoint (``train`` is filled in from ``config`` when missing).
    ``param_groups(model)`` may return torch-style param group dicts (e.g. no weight decay for
    norms); by default every parameter with ``requires_grad`` is trained in one group.
    With ``out_dir=None`` nothing is written (no logs, no checkpoints). ``capture`` replaces the
    CUDA-graph backend of ``config.cuda_graph`` (tests pass :class:`EagerStepCapture` to run the
    captured path's bookkeeping on a CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Batches,
        config: TrainConfig,
        out_dir: str | os.PathLike | None = None,
        run_config: Mapping[str, Any] | None = None,
        param_groups: Callable[[nn.Module], Iterable[dict[str, Any]]] | None = None,
        capture: Any = None,
    ):
        if not callable(getattr(model, "loss", None)):
            raise TypeError(
                f"{type(model).__name__} has no loss(batch) method; the Trainer trains modules with one"
            )
        if isinstance(config, Mapping):
            config = TrainConfig.from_dict(config)
        self.config = config
        self.batches = batches
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.run_config = dict(run_config) if run_config is not None else {}
        self.run_config.setdefault("train", config.to_dict())

        self.device, self._owns_group = dist_.setup(config.device)
        self.rank = dist_.rank()
        self.world_size = dist_.world_size()
        self.is_main = self.rank == 0
        self.model = model.to(self.device)

        groups = (
            list(param_groups(self.model))
            if param_groups is not None
            else [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        )
        fused = self.device.type in ("cuda", "cpu")  # fused AdamW: 10-15% faster steps on CPU too
        self._capture = capture
        if self._capture is None and config.cuda_graph:
            if self.device.type != "cuda":
                warnings.warn(f"train.cuda_graph: the device is {self.device}, not CUDA; training eagerly",
                              RuntimeWarning, stacklevel=2)
            elif dist_.world_size() > 1:
                warnings.warn("train.cuda_graph: not with DistributedDataParallel; training eagerly",
                              RuntimeWarning, stacklevel=2)
            else:
                self._capture = CudaStepCapture()
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=config.lr,
            betas=config.betas,
            weight_decay=config.weight_decay,
            fused=fused or None,
            capturable=isinstance(self._capture, CudaStepCapture),
        )
        for g in self.optimizer.param_groups:
            g["base_lr"] = g["lr"]
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]

        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # DDP broadcasts rank 0's parameters here, so the EMA below starts identical on all ranks.
            self._ddp = DistributedDataParallel(
                _LossForward(self.model),
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.ddp_find_unused,
            )
            self._loss_fn: Callable[[dict[str, Any]], Any] = self._ddp
        else:
            self._ddp = None
            self._loss_fn = self.model.loss
        self.ema = _ema_class()(self.model, config.ema_decay)
        self._bf16 = config.bf16 and self.device.type == "cuda"
        self.step = 0

    # -- the loop ---------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> nn.Module:
        """Train to ``config.steps``; return the model with the EMA weights copied in.

        ``resume=True`` continues from the latest checkpoint in ``out_dir`` (same step, data order,
        EMA, LR schedule and optimizer moments), or starts fresh with a warning when there is none.
        """
        cfg = self.config
        try:
            if self.is_main and self.out_dir is not None:
                recover_checkpoints(self.out_dir / CHECKPOINTS_SUBDIR)
            dist_.barrier()
            if resume:
                self._resume()
                if self.step >= cfg.steps:
                    warnings.warn(f"{self.out_dir} is already at step {self.step} (train.steps is {cfg.steps}): "
                                  "nothing to train; ask for more steps to continue it", stacklevel=2)
            elif self.out_dir is not None and latest_checkpoint(self.out_dir) is not None:
                raise FileExistsError(
                    f"{self.out_dir} already holds checkpoints (latest {latest_checkpoint(self.out_dir).name}); "
                    "pass resume=True to continue that run, or use another out_dir"
                )
            log = None
            if self.is_main and self.out_dir is not None:
                log = _RunLog(self.out_dir, self.step, resume)
            bar = None
            if self.is_main and cfg.progress and self.step < cfg.steps:
                from tqdm import tqdm

                bar = tqdm(total=cfg.steps, initial=self.step, dynamic_ncols=True, desc="train")
            try:
                self._loop(log, bar)
            finally:
                if bar is not None:
                    bar.close()
                if log is not None:
                    log.close()
        finally:
            if self._owns_group:
                dist_.teardown()
                self._owns_group = False
        self.ema.copy_to(self.model)
        return self.model

    def _loop(self, log: _RunLog | None, bar: Any) -> None:
        cfg = self.config
        acc_loss = torch.zeros((), device=self.device)
        acc_grad = torch.zeros((), device=self.device)
        acc_logs: dict[str, Any] = {}
        n_acc, t_last = 0, time.perf_counter()
        self.model.train()
        graph, warm_from = None, self.step
        while self.step < cfg.steps:
            step = self.step
            lr = learning_rate(step, cfg)
            self._set_lr(step)
            torch.manual_seed(_torch_seed(cfg.seed, step, self.rank))
            if self._capture is None or step < warm_from + GRAPH_WARMUP:  # eager
                with self._capture.warmup() if self._capture is not None else _nullcontext():
                    loss, logs, grad_norm = self._update(self._batch(step))
            else:
                if graph is None:
                    graph = self._capture_update(step)
                if graph is None:  # the capture failed: eager from here on
                    loss, logs, grad_norm = self._update(self._batch(step))
                else:
                    loss, logs, grad_norm = graph.run(step)
            self.step += 1
            if self.step % cfg.ema_every == 0:
                self.ema.update()

            acc_loss += loss.detach().float()
            acc_grad += grad_norm.detach().float()
            for k, v in logs.items():
                v = v.detach().float().mean() if isinstance(v, Tensor) else float(v)
                acc_logs[k] = acc_logs[k] + v if k in acc_logs else v
            n_acc += 1
            if bar is not None:
                bar.update(1)

            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                mean_loss = acc_loss / n_acc
                if self._ddp is not None:
                    torch.distributed.all_reduce(mean_loss)
                    mean_loss /= self.world_size
                mean_loss = mean_loss.item()
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss is {mean_loss} at step {self.step}")
                now = time.perf_counter()
                row = {
                    "step": self.step,
                    "loss": mean_loss,
                    "lr": lr,
                    "it/s": n_acc / max(now - t_last, 1e-9),
                    "grad_norm": (acc_grad / n_acc).item(),
                }
                row.update({k: float(v) / n_acc for k, v in acc_logs.items()})
                if log is not None:
                    log.write(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4g}", lr=f"{lr:.2e}", refresh=False)
                acc_loss.zero_()
                acc_grad.zero_()
                acc_logs.clear()
                n_acc, t_last = 0, now

            if self.out_dir is not None and (self.step % cfg.ckpt_every == 0 or self.step == cfg.steps):
                self.save()

    def _capture_update(self, step: int) -> _StepGraph | None:
        try:
            return _StepGraph(self, step)
        except Exception as e:  # e.g. a host sync inside the loss: the update cannot be captured
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            warnings.warn(f"train.cuda_graph: the update of {type(self.model).__name__} could not be captured "
                          f"({why}); training eagerly", RuntimeWarning, stacklevel=3)
            self._capture = None
            self.optimizer.zero_grad(set_to_none=True)
            return None

    def _batch(self, step: int) -> dict[str, Any]:
        return _to_device(self.batches(step, np.random.default_rng([self.config.seed, step, self.rank])), self.device)

    def _update(self, batch: Mapping[str, Any], capturing: bool = False) -> tuple[Tensor, dict[str, Any], Tensor]:
        """One optimizer update on ``batch``: ``(loss, logs, grad norm)``. Also what a graph captures."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        # Under a capture autocast must not cache casts of the weights (torch's CUDA-graph docs).
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16, cache_enabled=not capturing):
            out = self._loss_fn(batch)
        loss, logs = out if isinstance(out, tuple) else (out, {})
        loss.backward()
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm)
        self.optimizer.step()
        # Detached: holding the autograd graph past the step keeps its AccumulateGrad nodes alive,
        # which crosses streams when the next update is captured.
        logs = {k: v.detach() if isinstance(v, Tensor) else v for k, v in logs.items()}
        return loss.detach(), logs, grad_norm

    def _set_lr(self, step: int) -> None:
        for g in self.optimizer.param_groups:
            value = learning_rate(step, self.config, g["base_lr"])
            if isinstance(g["lr"], Tensor):
                g["lr"].fill_(value)  # a captured optimizer step reads it in place
            else:
                g["lr"] = value

    # -- checkpoints ------------------------------------------------------------------------

    def save(self) -> Path | None:
        """Write ``out_dir/checkpoints/step-<step>`` (rank 0), prune to ``keep_last``, barrier."""
        if self.out_dir is None:
            raise ValueError("Trainer has no out_dir to save checkpoints into")
        path = self.out_dir / CHECKPOINTS_SUBDIR / step_dir_name(self.step)
        if self.is_main:
            model_state, optimizer_tensors, trainer_state = self._checkpoint_state()
            save_checkpoint(path, model_state, self.run_config, optimizer_tensors, trainer_state)
            if self.config.keep_last > 0:
                for old in checkpoint_dirs(self.out_dir)[: -self.config.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        dist_.barrier()
        return path if self.is_main else None

    def _checkpoint_state(
        self,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        raw = _clone_state(self.model.state_dict())
        self.ema.copy_to(self.model)
        ema_weights = _clone_state(self.model.state_dict())
        self.model.load_state_dict(raw)  # copies back in place: the optimizer keeps its params

        tensors: dict[str, Any] = {f"params.{k}": v for k, v in raw.items()}
        ema_skeleton = _split_tensors(self.ema.state_dict(), "ema", tensors)
        opt = self.optimizer.state_dict()
        for index, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"opt.{index}.{key}"] = value
        trainer_state = {
            "format": _TRAINER_STATE_FORMAT,
            "step": self.step,
            "world_size": self.world_size,
            "seeds": {
                "seed": self.config.seed,
                "data_rng": "numpy.random.default_rng([seed, step, rank])",
                "torch_seed": "numpy.random.SeedSequence([seed, step, rank, 1]).generate_state(1, uint64) & (2**63-1)",
            },
            "optimizer": {
                "class": type(self.optimizer).__name__,
                "param_groups": [{k: float(v) if isinstance(v, Tensor) else v for k, v in g.items()}
                                 for g in opt["param_groups"]],
            },
            "ema": ema_skeleton,
            "config": self.config.to_dict(),
        }
        return ema_weights, tensors, trainer_state

    def _resume(self) -> None:
        if self.out_dir is None:
            raise ValueError("resume=True needs an out_dir to find checkpoints in")
        path = latest_checkpoint(self.out_dir)
        if path is None:
            warnings.warn(
                f"resume=True but {self.out_dir} has no checkpoints; starting from step 0",
                stacklevel=3,
            )
            return
        ckpt = load_checkpoint(path)
        if ckpt.optimizer_tensors is None or ckpt.trainer_state is None:
            raise CheckpointError(
                f"{path}: no optimizer.safetensors / trainer_state.json, so it cannot be resumed"
            )
        ts, tensors = ckpt.trainer_state, ckpt.optimizer_tensors
        if ts.get("format") != _TRAINER_STATE_FORMAT:
            raise CheckpointError(f"{path / 'trainer_state.json'}: unknown format {ts.get('format')!r}")
        if ts.get("world_size", 1) != self.world_size:
            warnings.warn(
                f"resuming a run trained on {ts.get('world_size')} processes with {self.world_size}: "
                "the data order changes from here on",
                stacklevel=3,
            )
        raw = {k[len("params.") :]: v for k, v in tensors.items() if k.startswith("params.")}
        check_shapes(raw, self.model.state_dict(), path / OPTIMIZER_FILE)
        try:
            self.model.load_state_dict(raw)
        except RuntimeError as e:
            raise CheckpointError(
                f"{path / 'optimizer.safetensors'}: params do not fit the model: {e}"
            ) from e

        opt_state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                index, key = k[len("opt.") :].split(".", 1)
                opt_state.setdefault(int(index), {})[key] = v
        groups = ts["optimizer"]["param_groups"]
        if len(groups) != len(self.optimizer.param_groups):
            raise CheckpointError(
                f"{path / 'trainer_state.json'}: {len(groups)} optimizer param groups saved, "
                f"{len(self.optimizer.param_groups)} built"
            )
        for saved, current in zip(groups, self.optimizer.param_groups):
            for key, value in saved.items():  # JSON turned tuples (betas) into lists
                if isinstance(current.get(key), tuple) and isinstance(value, list):
                    saved[key] = tuple(value)
            saved["capturable"] = current.get("capturable", False)  # this run's, not the saved run's
        try:
            self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"{path / 'optimizer.safetensors'}: optimizer state does not fit: {e}"
            ) from e

        ema_tensors = {k: v.to(self.device) for k, v in tensors.items() if k.startswith("ema.")}
        self.ema.load_state_dict(_join_tensors(ts["ema"], ema_tensors))
        self.step = int(ts["step"])


# ----------------------------------------------------------------------------------------------


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if isinstance(v, Tensor):
            v = v.to(device, non_blocking=True)
        elif isinstance(v, Mapping):
            v = _to_device(v, device)
        out[k] = v
    return out


def _clone_state(state: Mapping[str, Any]) -> dict[str, Any]:
    import copy

    return {k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in state.items()}


def _split_tensors(obj: Any, prefix: str, out: dict[str, Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by ``{"__tensor__": key}`` and put it in ``out``."""
    if isinstance(obj, Tensor):
        out[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, Mapping):
        return {str(k): _split_tensors(v, f"{prefix}.{k}", out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{prefix}.{i}", out) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


class _RunLog:
    """Rank-0 logs: ``out_dir/log.csv`` and TensorBoard scalars under ``out_dir/tb``."""

    def __init__(self, out_dir: Path, start_step: int, resume: bool):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = out_dir / "log.csv"
        self.fieldnames: list[str] | None = None
        if resume and self.csv_path.exists():
            # Rows past the checkpoint were logged by the interrupted run and are replayed now.
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                self.fieldnames = list(reader.fieldnames or []) or None
                rows = [r for r in reader if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
            if self.fieldnames:
                with open(self.csv_path, "w", newline="") as f:
                    w = csv.DictWriter(f, self.fieldnames)
                    w.writeheader()
                    w.writerows(rows)
        elif self.csv_path.exists():
            self.csv_path.unlink()
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 if resume else None)
        except ImportError:
            warnings.warn("tensorboard is not installed; logging to log.csv only", stacklevel=2)

    def write(self, row: dict[str, Any]) -> None:
        if self.fieldnames is None:
            self.fieldnames = ["step", "loss", "lr", "it/s", "grad_norm"] + sorted(
                set(row) - {"step", "loss", "lr", "it/s", "grad_norm"}
            )
            with open(self.csv_path, "w", newline="") as f:
                csv.DictWriter(f, self.fieldnames).writeheader()
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, self.fieldnames, extrasaction="ignore").writerow(row)
        if self.tb is not None:
            step = row["step"]
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k.replace('/', '_per_')}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------
# CUDA-graph capture of the update


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


class CudaStepCapture:
    """``torch.cuda.CUDAGraph`` capture of one update; warm-up steps run on a side stream."""

    def __init__(self):
        self._side: torch.cuda.Stream | None = None

    def warmup(self):
        import contextlib

        @contextlib.contextmanager
        def side_stream():
            if self._side is None:
                self._side = torch.cuda.Stream()
            self._side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._side):
                yield
            torch.cuda.current_stream().wait_stream(self._side)

        return side_stream()

    def capture(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Record ``fn`` (nothing runs); the returned replay runs it and returns its static outputs."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()

        def replay():
            graph.replay()
            return out

        return replay


class EagerStepCapture:
    """Stand-in for :class:`CudaStepCapture` that runs on any device: "capturing" records ``fn``
    and each replay runs it. Counts both, so tests check the captured path's bookkeeping (static
    buffers, the tensor learning rate, resume) on a CPU."""

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def warmup(self):
        return _nullcontext()

    def capture(self, fn):
        self.captures += 1

        def replay():
            self.replays += 1
            return fn()

        return replay


class _StepGraph:
    """The captured update of a :class:`Trainer`: static batch buffers (none for a device-side
    sampler, whose draw is captured with the step), tensor learning rates, and the replay."""

    def __init__(self, trainer: Trainer, step: int):
        self.trainer = trainer
        for g in trainer.optimizer.param_groups:  # the schedule fills these in place from now on
            if not isinstance(g["lr"], Tensor):
                g["lr"] = torch.tensor(float(g["lr"]), device=trainer.device)
        trainer._set_lr(step)
        self.device_side = bool(getattr(trainer.batches, "device_side", False))
        if self.device_side:
            fn = lambda: trainer._update(_to_device(trainer.batches(step, None), trainer.device), capturing=True)
            self.static = None
        else:
            self.static = _static_copy(trainer._batch(step))
            fn = lambda: trainer._update(self.static, capturing=True)
        trainer.optimizer.zero_grad(set_to_none=True)
        self.replay = trainer._capture.capture(fn)

    def run(self, step: int) -> tuple[Tensor, dict[str, Any], Tensor]:
        if self.static is not None:
            _copy_into(self.static, self.trainer._batch(step))
        return self.replay()


def _static_copy(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _static_copy(v) if isinstance(v, Mapping) else v.clone() if isinstance(v, Tensor) else v
            for k, v in batch.items()}


def _copy_into(static: dict[str, Any], batch: Mapping[str, Any]) -> None:
    if static.keys() != batch.keys():
        raise ValueError(f"train.cuda_graph: a batch has keys {sorted(batch)}, the captured one {sorted(static)}")
    for k, v in batch.items():
        if isinstance(v, Mapping):
            _copy_into(static[k], v)
        elif isinstance(v, Tensor):
            if v.shape != static[k].shape:
                raise ValueError(f"train.cuda_graph: batch['{k}'] has shape {tuple(v.shape)}, the captured "
                                 f"one {tuple(static[k].shape)}; a captured step needs fixed batch shapes")
            static[k].copy_(v, non_blocking=True)
