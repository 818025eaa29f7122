"""`diffplan data list|make|info`: output, caching, and one-line errors with exit code 2."""

import numpy as np
import pytest
from diffplan.envs import get_task
from diffplan.envs import tasks as registry

from diffplan.cli import build_parser, main
from diffplan.data import OfflineDataset


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
