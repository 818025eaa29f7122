"""The Trainer: exact resume, LR schedule, clipping, EMA in model.safetensors, config checks."""

import csv
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from diffplan.train import (
    TrainConfig,
    Trainer,
    latest_checkpoint,
    learning_rate,
    load_checkpoint,
)


class Toy(nn.Module):
    """Regression with dropout and loss noise (both draw from torch's RNG) and an int buffer."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.1), nn.Mish(), nn.Linear(16, 2))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def loss(self, batch):
        self.calls += 1
        target = batch["y"] + 0.01 * torch.randn_like(batch["y"])
        err = self.net(batch["x"]) - target
        return err.pow(2).mean(), {"abs_err": err.abs().mean(), "const": 1.0}


_X = np.random.default_rng(123).normal(size=(64, 3)).astype(np.float32)
_Y = np.stack([_X.sum(1), _X[:, 0] * _X[:, 1]], 1).astype(np.float32)


def batches(step, rng):
    idx = rng.integers(0, len(_X), size=8)
    return {"x": _X[idx], "y": _Y[idx]}


def _cfg(**kw):
    base = {
        "steps": 20,
        "warmup_steps": 5,
        "lr": 1e-2,
        "weight_decay": 0.01,
        "ckpt_every": 10,
        "log_every": 5,
        "ema_decay": 0.9,
        "keep_last": 0,
        "progress": False,
    }
    base.update(kw)
    return TrainConfig(**base)


def _read_log(run):
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_tensors(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_after_a_crash_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    cfg = _cfg()
    straight = Trainer(Toy(), batches, cfg, tmp_path / "a", run_config={"policy": "toy"}).fit()

    class Killed(Exception):
        pass

    def dies_at_16(step, rng):
        if step == 16:
            raise Killed
        return batches(step, rng)

    with pytest.raises(Killed):
        Trainer(Toy(), dies_at_16, cfg, tmp_path / "b", run_config={"policy": "toy"}).fit()
    assert latest_checkpoint(tmp_path / "b").name == "step-00000010"
    # A writer killed mid-checkpoint (its pid is gone) leaves a hidden partial folder behind.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    partial = tmp_path / "b" / "checkpoints" / f".tmp-step-00000015-{dead.pid}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 5)

    # A differently initialized model: everything must come from the checkpoint.
    resumed = Trainer(Toy(seed=7), batches, cfg, tmp_path / "b", run_config={"policy": "toy"}).fit(
        resume=True
    )

    a = load_checkpoint(tmp_path / "a")
    b = load_checkpoint(tmp_path / "b")
    assert a.path.name == b.path.name == "step-00000020"
    _assert_same_tensors(a.model_state, b.model_state)  # EMA weights
    _assert_same_tensors(a.optimizer_tensors, b.optimizer_tensors)  # raw params, EMA, Adam moments
    assert a.trainer_state == b.trainer_state
    _assert_same_tensors(straight.state_dict(), resumed.state_dict())
    assert not partial.exists()  # cleaned up by the resumed run
    assert any(k.startswith("opt.") and k.endswith(".exp_avg_sq") for k in a.optimizer_tensors)
    assert a.model_state["calls"].dtype == torch.long and int(a.model_state["calls"]) == 20
    # The crashed run's log rows past step 10 are dropped and replayed once.
    assert [int(r["step"]) for r in _read_log(tmp_path / "b")] == [5, 10, 15, 20]
    assert [r["loss"] for r in _read_log(tmp_path / "a")] == [r["loss"] for r in _read_log(tmp_path / "b")]


def test_a_crash_between_the_renames_of_a_checkpoint_rewrite_loses_nothing(tmp_path, dead_pid):
    cfg = _cfg()
    Trainer(Toy(), batches, cfg, tmp_path, run_config={"policy": "toy"}).fit()
    root = tmp_path / "checkpoints"
    saved = load_checkpoint(root / "step-00000020")
    # save_checkpoint rewriting step 20, killed between its two renames: the previous copy is
    # under .old-*, the new complete one under .tmp-*, and step-00000020 itself is gone.
    shutil.copytree(root / "step-00000020", root / f".old-step-00000020-{dead_pid}")
    os.rename(root / "step-00000020", root / f".tmp-step-00000020-{dead_pid}")

    def must_not_retrain(step, rng):
        raise AssertionError(f"step {step} retrained: the step-20 checkpoint was lost")

    with pytest.warns(UserWarning, match="already at step 20"):  # restored, so nothing is left to train
        Trainer(Toy(seed=7), must_not_retrain, cfg, tmp_path, run_config={"policy": "toy"}).fit(resume=True)
    assert sorted(os.listdir(root)) == ["step-00000010", "step-00000020"]
    _assert_same_tensors(load_checkpoint(tmp_path).model_state, saved.model_state)


def test_checkpoint_folder_holds_inference_weights_config_and_resume_state(tmp_path):
    cfg = _cfg(steps=6, ckpt_every=2, keep_last=2)
    Trainer(Toy(), batches, cfg, tmp_path, run_config={"policy": "toy", "task": "t"}).fit()
    dirs = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert dirs == ["step-00000004", "step-00000006"]  # keep_last=2
    ck = load_checkpoint(tmp_path)
    assert set(ck.model_state) == set(Toy().state_dict())
    with open(ck.path / "config.yaml") as f:
        assert yaml.safe_load(f) == {
            "policy": "toy",
            "task": "t",
            "train": cfg.to_dict(),
        }
    ts = ck.trainer_state
    assert ts["step"] == 6 and ts["seeds"]["seed"] == cfg.seed and ts["config"] == cfg.to_dict()
    assert ts["optimizer"]["param_groups"][0]["betas"] == list(cfg.betas)
    assert {k.split(".")[0] for k in ck.optimizer_tensors} == {"params", "ema", "opt"}
    assert (tmp_path / "tb").is_dir()
    rows = _read_log(tmp_path)
    assert list(rows[0]) == [
        "step",
        "loss",
        "lr",
        "it/s",
        "grad_norm",
        "abs_err",
        "const",
    ]
    assert [int(r["step"]) for r in rows] == [5, 6]


def test_a_fresh_run_refuses_to_overwrite_an_existing_run(tmp_path):
    Trainer(Toy(), batches, _cfg(steps=2), tmp_path).fit()
    with pytest.raises(FileExistsError, match="resume=True"):
        Trainer(Toy(), batches, _cfg(steps=2), tmp_path).fit()


def test_lr_warms_up_linearly_then_follows_cosine_to_the_floor():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(4, cfg) == pytest.approx(0.5)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(35, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(60, cfg) == pytest.approx(0.55)
    assert learning_rate(110, cfg) == pytest.approx(0.1)
    assert learning_rate(500, cfg) == pytest.approx(0.1)
    const = TrainConfig(steps=110, warmup_steps=10, lr=1.0, lr_schedule="constant")
    assert learning_rate(4, const) == pytest.approx(0.5)
    assert [learning_rate(s, const) for s in (10, 60, 109)] == [1.0, 1.0, 1.0]
    assert learning_rate(0, TrainConfig(warmup_steps=0, steps=10, lr=2.0)) == pytest.approx(2.0)


def test_optimizer_uses_the_schedule_in_every_param_group(tmp_path):
    cfg = _cfg(steps=12, warmup_steps=4, log_every=1, ckpt_every=100)

    def groups(model):
        return [
            {"params": model.net[0].parameters()},
            {
                "params": model.net[3].parameters(),
                "lr": cfg.lr * 0.1,
                "weight_decay": 0.0,
            },
        ]

    trainer = Trainer(Toy(), batches, cfg, tmp_path, param_groups=groups)
    trainer.fit()
    for row in _read_log(tmp_path):  # row k logs the lr of the k-th update (0-based step k-1)
        assert float(row["lr"]) == pytest.approx(learning_rate(int(row["step"]) - 1, cfg))
    last = learning_rate(cfg.steps - 1, cfg)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(last)
    assert trainer.optimizer.param_groups[1]["lr"] == pytest.approx(0.1 * last)


class Steep(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.full((10,), 3.0))

    def loss(self, batch):
        return 1e3 * self.w.pow(2).sum()


@pytest.mark.parametrize("clip", [0.5, None])
def test_gradients_are_clipped_to_the_configured_norm(clip):
    model = Steep()
    Trainer(model, lambda s, r: {}, _cfg(steps=1, grad_clip=clip), None).fit()
    raw_norm = 1e3 * 2 * 3.0 * math.sqrt(10)
    assert model.w.grad.norm().item() == pytest.approx(clip if clip is not None else raw_norm, rel=1e-5)


def test_model_safetensors_holds_ema_weights_not_raw_weights(tmp_path):
    returned = Trainer(Toy(), batches, _cfg(steps=8, ema_decay=0.9), tmp_path / "ema").fit()
    ck = load_checkpoint(tmp_path / "ema")
    raw = {k[len("params.") :]: v for k, v in ck.optimizer_tensors.items() if k.startswith("params.")}
    ema_keys = [k for k in ck.optimizer_tensors if k.startswith("ema.")]
    assert set(raw) == set(ck.model_state)
    for name, value in ck.model_state.items():
        assert torch.equal(value, returned.state_dict()[name])  # fit() returns the EMA weights
        if value.is_floating_point():
            assert not torch.equal(value, raw[name]), name
            assert any(torch.equal(value, ck.optimizer_tensors[k]) for k in ema_keys if k.endswith(name))

    # With decay 0 the average is the latest raw model.
    Trainer(Toy(), batches, _cfg(steps=8, ema_decay=0.0), tmp_path / "no-ema").fit()
    ck0 = load_checkpoint(tmp_path / "no-ema")
    for name, value in ck0.model_state.items():
        assert torch.equal(value, ck0.optimizer_tensors[f"params.{name}"]), name


def test_config_rejects_unknown_keys_by_name_and_round_trips_through_yaml():
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({"steps": 5, "learning_rate": 1e-3})
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")
    cfg = TrainConfig(steps=7, betas=(0.8, 0.9), grad_clip=None)
    again = TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg and again.betas == (0.8, 0.9)


def test_config_reads_yaml_exponent_strings_and_names_bad_values():
    cfg = TrainConfig.from_dict(yaml.safe_load("lr: 2e-4\nsteps: 1e3\n"))  # YAML 1.1: both strings
    assert cfg.lr == 2e-4 and cfg.steps == 1000 and isinstance(cfg.steps, int)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps="lots")
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(warmup_steps=2.5)
    with pytest.raises(ValueError, match="bf16"):
        TrainConfig(bf16="yes")


def test_model_without_loss_is_rejected():
    with pytest.raises(TypeError, match="loss"):
        Trainer(nn.Linear(2, 2), batches, _cfg(), None)


# ------------------------------------------------------------------ captured (CUDA-graph) steps


def test_the_captured_update_path_trains_exactly_like_the_eager_loop_on_cpu(tmp_path):
    """EagerStepCapture stands in for a CUDA graph: static batch buffers, the learning rate as a
    tensor the schedule fills, the warm-up steps, and resume through the captured path. The only
    difference is float32 rounding: a tensor learning rate is float32, a Python one double."""
    from diffplan.train import EagerStepCapture
    from diffplan.train.trainer import GRAPH_WARMUP

    torch.set_num_threads(1)
    cfg = _cfg(cuda_graph=True)
    eager = Trainer(Toy(), batches, _cfg(), tmp_path / "eager").fit()
    cap = EagerStepCapture()
    captured = Trainer(Toy(), batches, cfg, tmp_path / "cap", capture=cap).fit()
    _assert_close(eager.state_dict(), captured.state_dict())
    assert cap.captures == 1 and cap.replays == cfg.steps - GRAPH_WARMUP
    np.testing.assert_allclose([float(r["loss"]) for r in _read_log(tmp_path / "eager")],
                               [float(r["loss"]) for r in _read_log(tmp_path / "cap")], rtol=1e-5)
    state = load_checkpoint(tmp_path / "cap").trainer_state
    assert all(isinstance(g["lr"], float) for g in state["optimizer"]["param_groups"])  # JSON, not tensors

    # Resume from step 10 through a new capture: the same weights as the uninterrupted run.
    shutil.rmtree(tmp_path / "cap" / "checkpoints" / "step-00000020")
    cap2 = EagerStepCapture()
    resumed = Trainer(Toy(seed=7), batches, cfg, tmp_path / "cap", capture=cap2).fit(resume=True)
    _assert_close(captured.state_dict(), resumed.state_dict())
    assert cap2.captures == 1 and cap2.replays == 10 - GRAPH_WARMUP


def _assert_close(a, b):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_a_captured_update_refuses_a_batch_of_another_shape():
    from diffplan.train import EagerStepCapture

    def ragged(step, rng):
        b = batches(step, rng)
        return b if step < 5 else {"x": b["x"][:4], "y": b["y"][:4]}

    with pytest.raises(ValueError, match=r"batch\['x'\] has shape \(4, 3\).*\(8, 3\)"):
        Trainer(Toy(), ragged, _cfg(), capture=EagerStepCapture()).fit()


def test_cuda_graph_on_a_cpu_warns_and_trains_eagerly():
    with pytest.warns(RuntimeWarning, match="not CUDA; training eagerly"):
        t = Trainer(Toy(), batches, _cfg(cuda_graph=True, steps=4))
    t.fit()
    assert t.step == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_captured_cuda_update_is_a_function_of_the_seed_and_learns():
    cfg = _cfg(device="cuda", cuda_graph=True, bf16=False, steps=200, log_every=50, ckpt_every=1000)
    runs = []
    for _ in range(2):
        t = Trainer(Toy(), batches, cfg)
        runs.append(t.fit())
        assert t._capture is not None
    _assert_same_tensors(runs[0].state_dict(), runs[1].state_dict())
    eager = Trainer(Toy(), batches, _cfg(device="cuda", bf16=False, steps=200, ckpt_every=1000)).fit()
    x, y = torch.from_numpy(_X).cuda(), torch.from_numpy(_Y).cuda()
    with torch.no_grad():
        runs[0].eval(), eager.eval()
        err_cap = (runs[0].net(x) - y).pow(2).mean().item()
        err_eager = (eager.net(x) - y).pow(2).mean().item()
    assert err_cap < 0.5 * ((y - y.mean(0)) ** 2).mean().item()  # it learned
    assert abs(err_cap - err_eager) < 0.5 * err_eager + 0.05  # as well as the eager loop


def test_an_update_that_cannot_be_captured_warns_and_trains_eagerly():
    from diffplan.train import EagerStepCapture

    class Refuses(EagerStepCapture):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    t = Trainer(Toy(), batches, _cfg(steps=8), capture=Refuses())
    with pytest.warns(RuntimeWarning, match="could not be captured .operation not permitted.*training eagerly"):
        t.fit()
    assert t.step == 8
