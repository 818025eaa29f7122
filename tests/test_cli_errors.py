"""The CLI rule: every user error ends in one line ``diffplan: error: ...`` with exit code 2; a
traceback only with ``--debug``. One or more ordinary mistakes per subcommand."""
import numpy as np
import pytest
import torch
import yaml

from diffplan import cli
from diffplan.cli import main
from diffplan.data import OfflineDataset
from diffplan.train import CheckpointError

POLICY = {"horizon": 8, "dim": 8, "dim_mults": [1, 2], "normalizer": "gaussian", "pad": False}
TRAIN = {"steps": 2, "batch_size": 4, "warmup_steps": 1, "progress": False}


@pytest.fixture(autouse=True)
def minari_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny dataset, a config for it, and a run trained from it through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    n = 100
    OfflineDataset(rng.normal(size=(n, 4)), rng.uniform(-1, 1, (n, 2)), rng.normal(size=n), np.zeros(n, bool),
                   np.arange(n) % 50 == 49).to_npz(root / "d.npz")
    _config(root, "tiny.yaml")
    assert main(["train", str(root / "tiny.yaml"), "--out", str(root / "run")]) == 0
    return root


def _config(root, name, train=None, **top):
    cfg = {"kind": "diffuser", "dataset": str(root / "d.npz"), "policy": POLICY, "train": {**TRAIN, **(train or {})},
           **top}
    (root / name).write_text(yaml.safe_dump(cfg))
    return str(root / name)


def _fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("diffplan: error: ") == 1 and err.endswith("\n")
    line = err.strip().splitlines()[-1]
    assert line.startswith("diffplan: error: ") and message in line, err


@pytest.mark.parametrize("argv, message", [
    ([], "required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["data", "list", "--all"], "unrecognized arguments: --all"),
    (["data", "make"], "required: name"),
    (["data", "make", "no-such-task"], "unknown task 'no-such-task'"),
    (["data", "info", "missing.npz"], "no such file"),
    (["eval", "CKPT", "--episodes", "0"], "argument --episodes: must be >= 1, got 0"),
    (["eval", "CKPT", "--episodes", "-1"], "argument --episodes: must be >= 1, got -1"),
    (["eval", "CKPT", "--num-envs", "0"], "argument --num-envs: must be >= 1"),
    (["eval", "CKPT", "--seed", "x"], "argument --seed: expected a whole number, got 'x'"),
    (["eval", "no/such/checkpoint"], "checkpoint folder does not exist"),
    (["eval", "CKPT"], "the policy names no task or env id"),
    (["eval", "CKPT", "--device", "cuda:99"], "device 'cuda:99' is not available"),
    (["bench", "CKPT", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["bench", "CKPT", "--batch", "1,x"], "argument --batch: expected a whole number, got 'x'"),
    (["bench", "CKPT", "--calls", "0"], "argument --calls: must be >= 1, got 0"),
    (["bench", "CKPT", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["bench", "CKPT", "--device", "gpu"], "unknown device 'gpu'"),
    (["tune-steps", "CKPT", "--steps=-1,2"], "argument --steps: must be >= 0, got -1"),
    (["bench", "CKPT", "--cuda-graph"], "--cuda-graph needs --device cuda (on cpu every plan runs eagerly)"),
    (["tune-steps", "CKPT", "--episodes", "1"], "argument --episodes: must be >= 2, got 1"),
    (["tune-steps", "no/such/checkpoint"], "checkpoint folder does not exist"),
    (["demo", "--episodes", "0"], "argument --episodes: must be >= 1, got 0"),
    (["demo", "--checkpoint", "no/such/checkpoint"], "checkpoint no/such/checkpoint not found"),
    (["train", "no-such-config.yaml"], "does not exist"),
    (["train", "TINY", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["train", "TINY", "--out", "RUN"], "already holds a run (latest checkpoint step-00000002); pass --resume"),
    (["train", "TINY", "--out", "NEW", "--device", "cuda:99"], "device 'cuda:99' is not available"),
])
def test_ordinary_mistakes_end_in_one_error_line_with_exit_code_2(capsys, workdir, argv, message):
    names = {"CKPT": workdir / "run", "TINY": workdir / "tiny.yaml", "RUN": workdir / "run", "NEW": workdir / "new"}
    _fails(capsys, [str(names.get(a, a)) for a in argv], message)


@pytest.mark.parametrize("train, top, message", [
    ({"lr": "abc"}, {}, "train.lr: expected a number, got 'abc'"),
    ({"steps": -5}, {}, "TrainConfig.steps must be >= 1, got -5"),
    ({"steps": 0}, {}, "TrainConfig.steps must be >= 1, got 0"),
    ({"lr": 0}, {}, "TrainConfig.lr must be > 0"),
    ({"batch_size": "many"}, {}, "train.batch_size: expected a whole number, got 'many'"),
    ({}, {"optimizer": "adam"}, "unknown top-level key(s) ['optimizer']"),
    ({}, {"policy": {**POLICY, "dim": "wide"}}, "policy.dim: expected a whole number, got 'wide'"),
])
def test_config_mistakes_end_in_one_error_line(capsys, workdir, train, top, message):
    _fails(capsys, ["train", _config(workdir, "bad.yaml", train, **top), "--out", str(workdir / "bad")], message)


def test_resuming_with_a_changed_model_names_the_tensor_and_both_shapes(capsys, workdir):
    wider = _config(workdir, "wider.yaml", policy={**POLICY, "dim": 16})
    _fails(capsys, ["train", wider, "--out", str(workdir / "run"), "--resume", "--steps", "5"],
           r"optimizer.safetensors: tensor 'net.")


def test_resume_past_the_requested_steps_says_the_run_is_already_there(capsys, workdir):
    assert main(["train", str(workdir / "tiny.yaml"), "--out", str(workdir / "run"), "--resume", "--steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "diffplan: warning: " in err and "already at step 2" in err and "Traceback" not in err


def test_debug_shows_the_traceback(workdir):
    with pytest.raises(CheckpointError, match="does not exist"):
        main(["--debug", "eval", "no/such/checkpoint"])
    with pytest.raises(CheckpointError, match="does not exist"):
        main(["bench", "no/such/checkpoint", "--debug"])


def test_an_internal_error_is_one_line_with_exit_code_1(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(cli, "cmd_data_list", broken)
    assert main(["data", "list"]) == 1
    err = capsys.readouterr().err
    assert err == "diffplan: internal error: RuntimeError: something broke (rerun with --debug for the traceback)\n"
    with pytest.raises(RuntimeError):
        main(["data", "list", "--debug"])


def test_nan_weights_in_a_checkpoint_are_one_error_line(capsys, workdir, tmp_path):
    from diffplan.policies import load_policy

    policy = load_policy(workdir / "run")
    name, weight = next(iter(policy.net.named_parameters()))
    with torch.no_grad():
        weight.fill_(float("nan"))
    policy.save(tmp_path / "nan")
    _fails(capsys, ["bench", str(tmp_path / "nan"), "--calls", "1", "--batch", "1"], f"net.{name} holds NaN or inf")


def test_a_config_that_repeats_a_key_is_refused_naming_it(tmp_path):
    """Plain YAML keeps the last of two equal keys without a word: a second ``n_candidates:`` further
    down would undo the first. Training configs and checkpoint configs refuse it."""
    from diffplan.config import ConfigError
    from diffplan.policies.training import read_config
    from diffplan.train import CheckpointError
    from diffplan.train.checkpoint import _read_yaml

    text = "kind: bc\ntask: hopper-medium\npolicy:\n  hidden: [16]\n  hidden: [32]\n"
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"duplicate key 'hidden' \(first on line 4\)"):
        read_config(tmp_path / "c.yaml")
    with pytest.raises(CheckpointError, match="duplicate key 'hidden'"):
        _read_yaml(tmp_path / "c.yaml")
