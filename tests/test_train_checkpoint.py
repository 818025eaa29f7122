"""Checkpoint folders: round trip, latest-lookup, atomic writes, clear errors on damage."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from diffplan.policies.base import SpaceSpec, load_policy
from diffplan.policies.bc import BCConfig, BCPolicy
from diffplan.train import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    recover_checkpoints,
    save_checkpoint,
)
from diffplan.train import checkpoint as ckpt_mod


def _state():
    return {
        "w": torch.randn(4, 3),
        "half": torch.randn(5).to(torch.bfloat16),
        "count": torch.tensor(7, dtype=torch.long),
        "mask": torch.tensor([True, False]),
        "_extra_state": {"version": 2, "names": ["a", "b"]},
    }


def test_round_trip_keeps_every_tensor_dtype_and_non_tensor_entries(tmp_path):
    state = _state()
    config = {"policy": "bc", "train": {"lr": 1e-3, "betas": (0.9, 0.99)}}
    save_checkpoint(tmp_path / "ck", state, config, {"opt.0.exp_avg": torch.ones(3)}, {"step": 3})
    ck = load_checkpoint(tmp_path / "ck")
    assert set(ck.model_state) == set(state)
    for k in ("w", "half", "count", "mask"):
        assert ck.model_state[k].dtype == state[k].dtype
        assert torch.equal(ck.model_state[k], state[k])
    assert ck.model_state["_extra_state"] == {"version": 2, "names": ["a", "b"]}
    assert ck.config == {"policy": "bc", "train": {"lr": 1e-3, "betas": [0.9, 0.99]}}
    assert torch.equal(ck.optimizer_tensors["opt.0.exp_avg"], torch.ones(3))
    assert ck.trainer_state == {"step": 3}
    assert ck.path == tmp_path / "ck"
    # model.safetensors is a plain safetensors file any loader reads.
    assert torch.equal(load_file(str(tmp_path / "ck" / "model.safetensors"))["w"], state["w"])


def test_inference_only_checkpoint_has_no_optimizer_state(tmp_path):
    save_checkpoint(tmp_path / "ck", {"w": torch.zeros(2)}, {"policy": "bc"})
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.optimizer_tensors is None and ck.trainer_state is None
    assert sorted(os.listdir(tmp_path / "ck")) == [".complete", "config.yaml", "model.safetensors"]


def test_run_folder_resolves_to_latest_step_and_ignores_partial_writes(tmp_path):
    run = tmp_path / "run"
    for step in (5, 20, 10):
        save_checkpoint(
            run / "checkpoints" / f"step-{step:08d}",
            {"w": torch.full((2,), float(step))},
            {"s": step},
        )
    # A writer killed mid-way leaves a hidden folder with a half file, with a higher step.
    partial = run / "checkpoints" / ".tmp-step-00000030-99999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x10\x00\x00")
    assert latest_checkpoint(run) == run / "checkpoints" / "step-00000020"
    ck = load_checkpoint(run)
    assert ck.config == {"s": 20} and torch.equal(ck.model_state["w"], torch.full((2,), 20.0))
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_writer_failing_midway_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "step-00000010", {"w": torch.ones(3)}, {"s": 10})

    real_write = ckpt_mod._write_file
    calls = []

    def dying_write(path, data):
        calls.append(path.name)
        if len(calls) == 2:  # model.safetensors written, then the process "dies" on config.yaml
            path.write_bytes(data[: len(data) // 2])
            raise OSError("disk died")
        real_write(path, data)

    monkeypatch.setattr(ckpt_mod, "_write_file", dying_write)
    with pytest.raises(OSError, match="disk died"):
        save_checkpoint(run / "checkpoints" / "step-00000020", {"w": torch.zeros(3)}, {"s": 20})
    assert not (run / "checkpoints" / "step-00000020").exists()
    assert latest_checkpoint(run) == run / "checkpoints" / "step-00000010"
    assert load_checkpoint(run).config == {"s": 10}


def test_rewriting_a_checkpoint_keeps_files_it_does_not_own(tmp_path):
    ck = tmp_path / "ck"
    save_checkpoint(ck, {"w": torch.ones(1)}, {"v": 1}, {"params.w": torch.ones(1)}, {"step": 1})
    (ck / "metrics.json").write_text(json.dumps({"score": 0.5}))
    save_checkpoint(ck, {"w": torch.zeros(1)}, {"v": 2})
    assert json.loads((ck / "metrics.json").read_text()) == {"score": 0.5}
    loaded = load_checkpoint(ck)
    assert loaded.config == {"v": 2} and torch.equal(loaded.model_state["w"], torch.zeros(1))
    assert loaded.optimizer_tensors is None  # stale resume state is not carried into the new folder
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_model_safetensors_raises_checkpoint_error_naming_the_file(tmp_path, damage):
    ck = tmp_path / "ck"
    save_checkpoint(ck, {"w": torch.randn(64, 64)}, {"v": 1})
    f = ck / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) - 100], "garbage": b"\xff" * 64, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(corrupt|truncated)"):
        load_checkpoint(ck)


def test_missing_pieces_raise_checkpoint_errors_naming_them(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(tmp_path)  # empty folder, no checkpoints inside

    ck = tmp_path / "ck"
    save_checkpoint(ck, {"w": torch.ones(1)}, {"v": 1})
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_checkpoint(ck)

    save_checkpoint(ck, {"w": torch.ones(1)}, {"v": 1})
    (ck / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match=r"config\.yaml: missing"):
        load_checkpoint(ck)

    (ck / "config.yaml").write_text("policy: [unclosed\n")
    with pytest.raises(CheckpointError, match=r"config\.yaml: invalid YAML"):
        load_checkpoint(ck)

    (ck / "config.yaml").write_text("- just\n- a list\n")
    with pytest.raises(CheckpointError, match=r"config\.yaml: expected a mapping"):
        load_checkpoint(ck)


def test_unstorable_config_values_are_refused_rather_than_pickled(tmp_path):
    with pytest.raises(TypeError, match="without pickle"):
        save_checkpoint(tmp_path / "ck", {"w": torch.ones(1)}, {"fn": object()})
    assert not (tmp_path / "ck").exists()
    assert not os.listdir(tmp_path)


def test_recovery_puts_back_the_newest_complete_copy_and_drops_partial_ones(tmp_path, dead_pid):
    root, pid = tmp_path / "checkpoints", dead_pid
    # Rewrites of step 20 and step 30 killed between their two renames: the previous folder is
    # under .old-*, the new one under .tmp-*, complete for step 20, half-written for step 30.
    for step, new_is_complete in ((20, True), (30, False)):
        save_checkpoint(root / f".old-step-{step:08d}-{pid}", {"w": torch.zeros(1)}, {"v": "old"})
        save_checkpoint(root / f".tmp-step-{step:08d}-{pid}", {"w": torch.ones(1)}, {"v": "new"})
        if not new_is_complete:
            os.remove(root / f".tmp-step-{step:08d}-{pid}" / ".complete")
    live = root / f".tmp-step-00000040-{os.getppid()}"  # a writer still running
    live.mkdir()
    assert recover_checkpoints(root, dry_run=True) == [
        (root / f".tmp-step-00000020-{pid}", root / "step-00000020"),
        (root / f".tmp-step-00000030-{pid}", None),
        (root / f".old-step-00000020-{pid}", None),
        (root / f".old-step-00000030-{pid}", root / "step-00000030"),
    ]
    assert len(os.listdir(root)) == 5  # a dry run changes nothing
    recover_checkpoints(root)
    assert sorted(os.listdir(root)) == [live.name, "step-00000020", "step-00000030"]
    assert load_checkpoint(root / "step-00000020").config == {"v": "new"}
    assert load_checkpoint(root / "step-00000030").config == {"v": "old"}


def test_load_policy_does_not_need_the_resume_only_files(tmp_path):
    spec = SpaceSpec(obs_dim=3, act_dim=2, action_low=(-1.0, -1.0), action_high=(1.0, 1.0))
    ck = tmp_path / "bc"
    policy = BCPolicy(BCConfig(hidden=(8,)), spec)
    save_checkpoint(ck, policy.state_dict(), policy.run_config(), {"opt.0.x": torch.ones(2)}, {"step": 1})
    (ck / "optimizer.safetensors").write_bytes(b"\xff" * 16)
    (ck / "trainer_state.json").write_text("{not json")
    loaded = load_policy(ck)
    assert torch.equal(loaded.net[0].weight, policy.net[0].weight)
    with pytest.raises(CheckpointError, match="optimizer.safetensors.*corrupt"):
        load_checkpoint(ck)  # resuming still refuses them
