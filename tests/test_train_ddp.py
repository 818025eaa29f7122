"""Two-process gloo DDP through torchrun: same checkpoint format, ranks in sync, different shards."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffplan.train import load_checkpoint

SCRIPT = Path(__file__).with_name("train_ddp_script.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_gloo_run_keeps_ranks_identical_and_writes_one_checkpoint(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(SCRIPT),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ck = load_checkpoint(tmp_path)
    assert ck.path.name == "step-00000012"
    assert sorted(os.listdir(ck.path)) == [
        ".complete",
        "config.yaml",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ]
    assert ck.trainer_state["world_size"] == 2 and ck.trainer_state["step"] == 12
    assert ck.config["policy"] == "toy"

    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert set(r0) == set(r1)
    for k in r0:  # started from different inits; DDP broadcast and all-reduce keep them equal
        assert torch.equal(r0[k], r1[k]), k
    for name, value in ck.model_state.items():
        assert torch.equal(value, r0[f"model.{name}"]), name
    for k, v in r0.items():
        if k.startswith("opt."):
            assert torch.equal(v, ck.optimizer_tensors[k]), k

    d0 = json.loads((tmp_path / "rank0.json").read_text())
    d1 = json.loads((tmp_path / "rank1.json").read_text())
    assert d0["world_size"] == d1["world_size"] == 2
    assert d0["drawn"] != d1["drawn"]  # each rank draws its own shard
    # Only rank 0 logs: one row per log step.
    rows = (tmp_path / "log.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["4", "8", "12"]
