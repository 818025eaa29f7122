"""`diffplan data list|make|info`: output, caching, and one-line errors with exit code 2."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_make_script import TINY
from diffplan.envs import get_task
from diffplan.envs import tasks as registry

from diffplan.cli import build_parser, main
from diffplan.data import OfflineDataset, from_minari

SCRIPT = Path(__file__).with_name("data_make_script.py")


@pytest.fixture(autouse=True)
def minari_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return tmp_path / "minari"


@pytest.fixture()
def tiny_task(monkeypatch):
    card = get_task("pointmaze-umaze").replace(name="pointmaze-umaze-cli", dataset_steps=1200)
    monkeypatch.setitem(registry._REGISTRY, card.name, card)
    return card


def test_parser_has_the_data_group():
    args = build_parser().parse_args(["data", "make", "pointmaze-umaze", "--force"])
    assert args.name == "pointmaze-umaze" and args.force and callable(args.func)


def test_list_shows_tasks_and_whether_made(capsys, tiny_task):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("pointmaze-umaze-cli "))
    assert line.split()[5] == "-" and "pointmaze-medium" in out
    assert main(["data", "make", tiny_task.name, "--quiet"]) == 0
    assert "1,200 steps" in capsys.readouterr().out
    main(["data", "list"])
    line = next(l for l in capsys.readouterr().out.splitlines()
                if l.startswith("pointmaze-umaze-cli "))
    assert line.split()[5] == "made"
    assert main(["data", "make", tiny_task.name]) == 0
    assert "already made" in capsys.readouterr().out


def test_info_on_a_made_task_and_on_a_file(capsys, tiny_task, tmp_path):
    assert main(["data", "info", tiny_task.name]) == 0
    assert "not made yet" in capsys.readouterr().out
    main(["data", "make", tiny_task.name, "--quiet"])
    capsys.readouterr()
    assert main(["data", "info", tiny_task.name]) == 0
    out = capsys.readouterr().out
    assert "1,200 steps" in out and "episode returns:" in out and "refs      min 12.98" in out
    n = 10
    OfflineDataset(np.zeros((n, 3)), np.zeros((n, 1)), np.ones(n), np.zeros(n, bool),
                   np.arange(n) % 5 == 4).to_npz(tmp_path / "d.npz")
    assert main(["data", "info", str(tmp_path / "d.npz")]) == 0
    assert "10 steps, 2 episodes" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["data", "info", "no-such-thing"], "unknown dataset 'no-such-thing'"),
    (["data", "make", "no-such-task"], "unknown task 'no-such-task'"),
    (["data", "info", "missing.hdf5"], "no such file"),
])
def test_errors_are_one_line_with_exit_code_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffplan: error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.fixture()
def tiny(monkeypatch):
    """A task whose recipe is 600 random steps (tests/data_make_script.py), for subprocesses too."""
    monkeypatch.setitem(registry._REGISTRY, TINY.name, TINY)
    return TINY


def run_script(*argv):
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, argv)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())


def test_kill_9_during_data_make_force_keeps_the_old_dataset(capsys, tiny, minari_root, tmp_path,
                                                             dead_pid):
    assert main(["data", "make", tiny.name, "--quiet"]) == 0
    before = from_minari(tiny.dataset_id)
    ready = tmp_path / "ready"
    proc = run_script("--hang", ready, "data", "make", tiny.name, "--force", "--quiet")
    deadline = time.monotonic() + 60
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()
    proc.kill()  # SIGKILL in the middle of writing the replacement
    proc.wait()
    capsys.readouterr()
    for name in (tiny.name, tiny.dataset_id):
        assert main(["data", "info", name]) == 0
        out = capsys.readouterr().out
        assert "600 steps, 12 episodes" in out
    assert main(["data", "make", tiny.name]) == 0
    assert "already made" in capsys.readouterr().out
    folder = minari_root / tiny.dataset_id
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]  # leftover removed
    after = from_minari(tiny.dataset_id)
    np.testing.assert_array_equal(before.observations, after.observations)

    # Killed between the two renames of the swap: the complete new copy is under a hidden name.
    os.rename(folder, folder.parent / f".tmp-{folder.name}-{dead_pid}")
    assert main(["data", "info", tiny.name]) == 0
    assert "not made yet" in capsys.readouterr().out
    assert main(["data", "make", tiny.name]) == 0
    assert "already made" in capsys.readouterr().out
    np.testing.assert_array_equal(from_minari(tiny.dataset_id).observations, before.observations)


def test_two_concurrent_data_makes_make_the_dataset_once(tiny, tmp_path):
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = [run_script("--sync", sync, "data", "make", tiny.name, "--quiet") for _ in range(2)]
    results = [proc.communicate(timeout=120) + (proc.returncode,) for proc in procs]
    assert [rc for _, _, rc in results] == [0, 0], results
    assert len((sync / "builds").read_text().split()) == 1, results
    assert sorted("already made" in out for out, _, _ in results) == [False, True], results
    assert tiny.dataset_is_made()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_cache_is_listed_refused_and_remade(capsys, tiny, minari_root, damage):
    main(["data", "make", tiny.name, "--quiet"])
    h5 = minari_root / tiny.dataset_id / "data" / "main_data.hdf5"
    if damage == "truncate":
        h5.write_bytes(h5.read_bytes()[:5000])
    else:
        h5.unlink()
    capsys.readouterr()
    main(["data", "list"])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith(tiny.name + " "))
    assert line.split()[5] == "corrupt"
    assert main(["data", "info", tiny.name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "is corrupt: " in err and "`diffplan data make tiny-synthetic --force`" in err
    assert main(["data", "make", tiny.name, "--quiet"]) == 0
    assert "corrupt" in capsys.readouterr().out
    assert tiny.dataset_is_made() and len(from_minari(tiny.dataset_id)) == 600
