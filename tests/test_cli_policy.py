"""Training and evaluation beyond the shipped tasks: config overrides, `--dataset`, any Gymnasium
env, eval reports in the user's folder (never in a checkpoint), rendered videos."""
import json
import subprocess
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import yaml

import diffplan
from diffplan.cli import main
from diffplan.config import ConfigError, apply_overrides
from diffplan.data import OfflineDataset, load
from diffplan.eval import evaluate
from diffplan.policies.training import train_policy

ROOT = Path(__file__).resolve().parents[1]
TINY = {"horizon": 8, "dim": 8, "dim_mults": [1, 2], "steps": 3, "runtime": {"n_action_steps": 4}}
TRAIN = {"steps": 6, "batch_size": 16, "warmup_steps": 2, "ckpt_every": 6, "progress": False}


def pendulum_episodes(n: int = 4, seed: int = 0):
    """Random-action Pendulum-v1 episodes: per episode, (T+1) observations and T of the rest."""
    env = gym.make("Pendulum-v1", max_episode_steps=30)
    env.action_space.seed(seed)
    for ep in range(n):
        obs, _ = env.reset(seed=seed + ep)
        steps = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        done = False
        while not done:
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(steps, (obs, action, reward, terminated, truncated)):
                steps[key].append(value)
            done = terminated or truncated
        yield {k: np.asarray(v) for k, v in steps.items()}


@pytest.fixture(scope="module")
def pendulum_data():
    eps = list(pendulum_episodes())
    return OfflineDataset(
        observations=np.concatenate([e["observations"][:-1] for e in eps]),
        actions=np.concatenate([e["actions"] for e in eps]),
        rewards=np.concatenate([e["rewards"] for e in eps]),
        terminals=np.concatenate([e["terminations"] for e in eps]),
        timeouts=np.concatenate([e["truncations"] for e in eps]),
        env_id="Pendulum-v1", source="random actions")


@pytest.fixture(scope="module")
def pendulum_run(pendulum_data, tmp_path_factory):
    """A tiny Diffusion Policy trained on an in-memory dataset: no task or dataset key needed."""
    out = tmp_path_factory.mktemp("pendulum")
    train_policy({"kind": "diffusion_policy", "policy": TINY, "train": TRAIN}, out, dataset=pendulum_data)
    return out


# ---- config overrides -----------------------------------------------------------------------

def test_overrides_are_yaml_values_set_at_dotted_keys():
    cfg = {"kind": "bc", "policy": {"horizon": 16}, "train": None}
    out = apply_overrides(cfg, ["policy.horizon=64", "train.lr=1e-4", "policy.dim_mults=[1, 2]",
                                "policy.runtime.n_action_steps=4", "train.bf16=false", "task=hopper-medium"])
    assert out == {"kind": "bc", "task": "hopper-medium", "train": {"lr": 1e-4, "bf16": False},
                   "policy": {"horizon": 64, "dim_mults": [1, 2], "runtime": {"n_action_steps": 4}}}
    assert cfg["policy"] == {"horizon": 16}  # the input is not changed
    for bad in ("policy.horizon", "=3", "policy..horizon=3", "policy.horizon.x=1"):
        with pytest.raises(ConfigError, match="override"):
            apply_overrides(cfg, [bad])


def test_train_cli_applies_overrides_and_dataset_and_records_them(pendulum_data, tmp_path, capsys):
    data = tmp_path / "pendulum.npz"
    pendulum_data.to_npz(data)
    config = tmp_path / "dp.yaml"
    config.write_text(yaml.safe_dump({"kind": "diffusion_policy", "policy": TINY, "train": TRAIN}))
    out = tmp_path / "run"
    assert main(["train", str(config), "policy.horizon=16", "--dataset", str(data), "--out", str(out),
                 "train.lr=1e-4"]) == 0
    saved = yaml.safe_load(next((out / "checkpoints").glob("step-*/config.yaml")).read_text())
    assert saved["policy"]["horizon"] == 16 and saved["train"]["lr"] == 1e-4
    assert saved["data"]["dataset"] == str(data) and saved["spec"]["env_id"] == "Pendulum-v1"

    capsys.readouterr()
    assert main(["train", str(config), "policy.horizn=16", "--dataset", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "horizn" in err and len(err.splitlines()) == 1


def test_train_help_shows_overrides(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "KEY=VALUE" in text and "policy.horizon=64" in text and "--dataset" in text


# ---- any env, any dataset -------------------------------------------------------------------

def test_a_minari_dataset_brings_its_env_and_the_checkpoint_keeps_it(tmp_path, monkeypatch, pendulum_run):
    import minari
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    buffers = [EpisodeBuffer(id=i, **e) for i, e in enumerate(pendulum_episodes(2))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Minari warns about every metadata field left out
        minari.create_dataset_from_buffers("local/pendulum-v0", buffers, env=gym.make("Pendulum-v1", g=9.0),
                                           algorithm_name="random")
    data = load("local/pendulum-v0")
    assert (data.env_id, data.env_kwargs) == ("Pendulum-v1", {"g": 9.0})
    assert diffplan.load_policy(pendulum_run).spec.env_id == "Pendulum-v1"


def test_evaluate_takes_an_env_id_or_an_env_and_normalizes_only_with_references(pendulum_run):
    policy = diffplan.load_policy(pendulum_run)
    raw = evaluate(policy, "Pendulum-v1", episodes=2, num_envs=2)
    assert raw.task == "Pendulum-v1" and raw.ref_min_score is None
    assert raw.normalized_mean == raw.return_mean and "normalized" not in raw.summary()
    assert evaluate(policy, episodes=2, num_envs=2).returns == raw.returns  # the policy's own env
    scored = evaluate(policy, "Pendulum-v1", episodes=2, ref_min_score=-1000.0, ref_max_score=0.0)
    assert scored.normalized_mean == pytest.approx(100 + raw.return_mean / 10)
    env = gym.make("Pendulum-v1", max_episode_steps=7)
    mine = evaluate(policy, env, episodes=2, num_envs=5)
    assert mine.lengths == [7, 7] and mine.num_envs == 1 and env.unwrapped is not None
    with pytest.raises(ValueError, match="Pendulm-v1"):
        evaluate(policy, "Pendulm-v1", episodes=1)
    with pytest.raises(ConfigError, match="both references"):
        evaluate(policy, "Pendulum-v1", episodes=1, ref_min_score=-1000.0)


def test_eval_cli_with_env_writes_to_runs_eval(pendulum_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(pendulum_run), "--env", "Pendulum-v1", "--episodes", "2",
                 "--ref-min", "-1000", "--ref-max", "0"]) == 0
    report = json.loads((tmp_path / "runs/eval" / pendulum_run.name / "report.json").read_text())
    assert report["task"] == "Pendulum-v1" and report["ref_min_score"] == -1000
    assert not list(pendulum_run.rglob("metrics.json")) and not list(pendulum_run.rglob("eval"))


def test_eval_of_a_shipped_checkpoint_leaves_the_repository_unchanged(tmp_path, monkeypatch):
    def status():
        return subprocess.run(["git", "status", "--porcelain", "--ignored", "checkpoints"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    before = status()
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "checkpoints/pointmaze-umaze/bc", "--episodes", "2", "--num-envs", "2"]) == 0
    assert (tmp_path / "runs/eval/pointmaze-umaze-bc/report.json").is_file()
    assert status() == before


# ---- videos -----------------------------------------------------------------------------------

def test_locomotion_video_renders_the_robot(tmp_path):
    policy = diffplan.load_policy("checkpoints/hopper-medium/bc")
    env = gym.make("Hopper-v5", render_mode="rgb_array", camera_name="track", max_episode_steps=16)
    report = evaluate(policy, env, episodes=1, video=True)
    assert len(report.frames) == 5 and report.frame_fps == pytest.approx(125 / 4)  # every 4th of 16 steps
    frame = report.frames[-1].astype(int)
    robot = (frame[..., 0] > 120) & (frame[..., 0] > frame[..., 1] + 40) & (frame[..., 1] > frame[..., 2])
    assert robot.sum() > 200  # the hopper's orange body, in a green and grey scene
    (video,) = report.save(tmp_path, video=True).glob("episode.*")
    assert video.name in ("episode.mp4", "episode.gif") and video.stat().st_size > 1000
    with pytest.raises(ConfigError, match="rgb_array"):
        evaluate(policy, gym.make("Hopper-v5"), episodes=1, video=True)


def test_eval_cli_video_of_a_locomotion_task_follows_the_robot(tmp_path):
    assert main(["eval", "checkpoints/hopper-medium/bc", "--episodes", "1", "--num-envs", "1", "--video",
                 "--out", str(tmp_path)]) == 0
    import imageio.v2 as imageio

    video = next(tmp_path.glob("episode.*"))
    last = np.asarray(imageio.mimread(video, memtest=False)[-1]).astype(int)
    robot = (last[..., 0] > 120) & (last[..., 0] > last[..., 1] + 40) & (last[..., 1] > last[..., 2])
    assert robot.sum() > 200  # still in view at the end of the episode (the tracking camera)
