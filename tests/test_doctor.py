"""`diffplan doctor`: finds damaged datasets and checkpoints and prints the command that heals each."""

import os
import subprocess

import pytest
import torch
from data_make_script import TINY
from diffplan.envs import tasks as registry

from diffplan.cli import main
from diffplan.train import save_checkpoint


@pytest.fixture(autouse=True)
def minari_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setitem(registry._REGISTRY, TINY.name, TINY)
    return tmp_path / "minari"


def fixes(out):
    return [line.split("fix: ", 1)[1] for line in out.splitlines() if line.strip().startswith("fix: ")]


def test_doctor_names_what_is_wrong_and_the_command_that_heals_it(capsys, minari_root, tmp_path,
                                                                 dead_pid):
    run = tmp_path / "run" / "checkpoints"
    for step in (10, 20, 30):
        save_checkpoint(run / f"step-{step:08d}", {"w": torch.ones(2)}, {"kind": "toy"},
                        {"params.w": torch.ones(2)}, {"step": step})
    assert main(["data", "make", TINY.name, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["doctor", str(tmp_path / "run")]) == 0
    assert "checked 1 datasets" in capsys.readouterr().out

    (minari_root / TINY.dataset_id / "data" / "main_data.hdf5").write_bytes(b"garbage")
    (run / "step-00000020" / "model.safetensors").write_bytes(b"\x00" * 10)
    (run / "step-00000030" / "optimizer.safetensors").write_bytes(b"\x00" * 10)
    partial = run / f".tmp-step-00000040-{dead_pid}"
    partial.mkdir()
    assert main(["doctor", str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    assert "dataset diffplan/tiny-synthetic-v0 is corrupt: " in out
    assert "step-00000020/model.safetensors: corrupt" in out
    assert "step-00000030/optimizer.safetensors: corrupt" in out and "cannot be resumed" in out
    assert fixes(out) == [
        "diffplan data make tiny-synthetic --force",
        f"rm -r {partial}",
        f"rm -r {run / 'step-00000020'}",
        f"rm -f {run / 'step-00000030' / 'optimizer.safetensors'} "
        f"{run / 'step-00000030' / 'trainer_state.json'}",
    ]
    for fix in fixes(out):  # the printed commands do heal everything
        if fix.startswith("diffplan "):
            assert main(fix.split()[1:] + ["--quiet"]) == 0
        else:
            subprocess.run(fix, shell=True, check=True)
    capsys.readouterr()
    assert main(["doctor", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.endswith("all good\n")


def test_doctor_checks_checkpoints_under_the_working_folder_by_default(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["doctor"]) == 0
    assert "0 checkpoints" in capsys.readouterr().out
    save_checkpoint(tmp_path / "checkpoints" / "task" / "bc", {"w": torch.ones(1)}, {"kind": "bc"})
    os.remove(tmp_path / "checkpoints" / "task" / "bc" / "config.yaml")
    assert main(["doctor"]) == 1
    assert "config.yaml: missing" in capsys.readouterr().out
    capsys.readouterr()
    assert main(["doctor", "no-such-folder"]) == 2
    assert capsys.readouterr().err == "diffplan: error: no-such-folder: no such folder\n"
