"""Long-horizon maze planning: strided (keypoint) plans, the TD on a Diffuser's U-Net, the
near-time-optimal reference, and the per-checkpoint step search."""
import json

import numpy as np
import pytest
import torch
import yaml

import diffplan
from diffplan.cli import main as cli
from diffplan.data import LimitsNormalizer, SequenceWindows
from diffplan.envs import get_task
from diffplan.envs.maze import get_maze, make_expert, run_episodes
from diffplan.envs.maze_expert import TimeOptimalController
from diffplan.eval import evaluate
from diffplan.eval.tune import StepRow, choose_steps, write_default_steps
from diffplan.policies import DiffuserConfig
from diffplan.policies.diffuser import pd_tracking
from diffplan.policies.training import train_policy

TASK = "pointmaze-umaze"
STRIDED = {"horizon": 8, "plan_stride": 4, "dim": 8, "dim_mults": [1, 2], "steps": 3}


@pytest.fixture(scope="module")
def maze_data():
    return get_task(TASK).make_dataset(progress=False, steps=4000, seed=5)


@pytest.fixture(scope="module")
def strided(maze_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("strided")
    cfg = {"kind": "diffuser", "task": TASK, "policy": STRIDED,
           "train": {"steps": 20, "batch_size": 16, "warmup_steps": 2, "ckpt_every": 20, "progress": False}}
    return train_policy(cfg, out, dataset=maze_data, progress=False), out


def test_strided_windows_take_every_kth_step_of_one_episode(maze_data):
    w = SequenceWindows(maze_data, 5, keys=("observations",), stride=3)
    b = w.get_batch(np.arange(0, len(w), 97))
    for j, i in enumerate(range(0, len(w), 97)):
        start = w.starts[i]
        rows = start + 3 * np.arange(5)
        np.testing.assert_array_equal(b["observations"][j], maze_data.observations[rows])
        assert rows[-1] < w.ends[i]  # without padding a window never leaves its episode
    short = int((maze_data.episode_ends - maze_data.episode_starts).max())
    with pytest.raises(ValueError, match="stride 4"):
        SequenceWindows(maze_data, short // 4 + 2, keys=("observations",), stride=4)
    with pytest.raises(ValueError, match="stride"):
        SequenceWindows(maze_data, 4, stride=0)


def test_pd_tracking_interpolates_between_keypoints_and_rests_past_the_end():
    norm = LimitsNormalizer(4)
    norm.fit(np.array([[-2, -2, -5, -5], [2, 2, 5, 5]], np.float32))
    states = torch.tensor([[[0, 0, 1, 0], [1, 0, 1, 0], [1, 1, 0, 1.0]]])  # (1, H=3, 4), stride 4
    plans = norm.normalize(states)
    obs = torch.zeros(1, 4)
    # step 2 lies halfway between keypoint 0 (step 0) and keypoint 1 (step 4)
    a = pd_tracking(norm, plans, torch.tensor([1]), obs, 4, 2, stride=4)
    np.testing.assert_allclose(a.numpy(), [[0.5 + 1.0, 0.0]], atol=1e-5)
    # step 9 is past the last keypoint (step 8): rest at its position, velocity 0
    a = pd_tracking(norm, plans, torch.tensor([8]), obs, 4, 2, stride=4)
    np.testing.assert_allclose(a.numpy(), [[1.0, 1.0]], atol=1e-5)
    # stride 1 reads plan step index + 1 as before
    a = pd_tracking(norm, plans, torch.tensor([0]), obs, 4, 2, stride=1)
    np.testing.assert_allclose(a.numpy(), [[1.0 + 1.0, 0.0]], atol=1e-5)


def test_track_speed_runs_through_the_plan_faster():
    norm = LimitsNormalizer(4)
    norm.fit(np.array([[-2, -2, -5, -5], [2, 2, 5, 5]], np.float32))
    states = torch.tensor([[[0, 0, 1, 0], [1, 0, 1, 0], [2, 0, 1, 0.0]]])  # stride 4: steps 0, 4, 8
    plans = norm.normalize(states)
    obs = torch.zeros(1, 4)
    # at speed 2, env step 3 tracks plan step 6 (x = 1.5) with twice the planned velocity
    a = pd_tracking(norm, plans, torch.tensor([2]), obs, 4, 2, stride=4, speed=2.0)
    np.testing.assert_allclose(a.numpy(), [[1.5 + 2.0, 0.0]], atol=1e-5)
    # env step 5 is plan step 10, past the end (step 8): rest at x = 2
    a = pd_tracking(norm, plans, torch.tensor([4]), obs, 4, 2, stride=4, speed=2.0)
    np.testing.assert_allclose(a.numpy(), [[2.0, 0.0]], atol=1e-5)
    with pytest.raises(ValueError, match="track_speed"):
        DiffuserConfig(track_speed=0.0)


def test_a_strided_plan_needs_pd_tracking():
    with pytest.raises(ValueError, match="plan_stride 4 needs action_mode 'pd'"):
        DiffuserConfig(plan_stride=4, with_actions=True, action_mode="plan")


def test_strided_diffuser_plans_keypoints_from_the_start_to_the_goal(strided):
    policy, _ = strided
    env = get_task(TASK).make_env()
    obs, _ = env.reset(seed=1)
    policy.reset(seed=0)
    action = policy.act(obs)
    assert policy.action_space.contains(action.astype(np.float32))
    states = policy.plan_states(policy.planner._plans)[0].numpy()
    assert states.shape == (8, 4)  # 8 keypoints spanning 29 env steps
    np.testing.assert_allclose(states[0], obs["observation"], atol=1e-5)
    np.testing.assert_allclose(states[-1, :2], obs["desired_goal"], atol=1e-5)
    # warm starts shift a strided plan by the keypoints executed, not the env steps
    policy.planner.config.warm_start, policy.planner.config.n_action_steps = True, 8
    try:
        for _ in range(8):
            obs, *_ = env.step(policy.act(obs))
        before = policy.planner._plans.clone()
        from diffplan.runtime.planner import shift_plans

        shifted = shift_plans(before, torch.tensor([8 // 4]))
        np.testing.assert_allclose(shifted[0, 0].numpy(), before[0, 2].numpy())
        policy.act(obs)  # replans warm without error
    finally:
        policy.planner.config.warm_start, policy.planner.config.n_action_steps = False, 100_000


def test_td_on_a_diffusers_unet_trains_only_its_drafter(strided, maze_data, tmp_path):
    policy, out = strided
    ckpt = out / "checkpoints" / "step-00000020"
    cfg = {"kind": "trajectory_diffuser", "task": TASK,
           "policy": {"horizon": 8, "plan_stride": 4, "dim": 8, "dim_mults": [1, 2], "refine_steps": 1,
                      "t_start": 0.4, "refiner_from": str(ckpt), "train_parts": ["drafter"],
                      "draft_width": 16, "draft_depth": 1, "draft_heads": 2, "draft_stride": 4},
           "train": {"steps": 5, "batch_size": 8, "warmup_steps": 1, "ckpt_every": 5, "progress": False}}
    td = train_policy(cfg, tmp_path / "td", dataset=maze_data, progress=False)
    diffuser = diffplan.load_policy(ckpt)
    for (k, a), b in zip(td.net.state_dict().items(), diffuser.net.state_dict().values()):
        assert torch.equal(a, b), k  # the refiner is the Diffuser's U-Net, untouched by training
    reloaded = diffplan.load_policy(tmp_path / "td")
    obs, _ = get_task(TASK).make_env().reset(seed=2)
    reloaded.reset(seed=0)
    reloaded.act(obs)
    states = reloaded.plan_states(reloaded.planner._plans)[0]
    np.testing.assert_allclose(states[-1, :2].numpy(), obs["desired_goal"], atol=1e-5)
    # 0 steps from the runtime is the draft alone (not "the default"), with start and goal imposed
    reloaded.planner.config.steps = 0
    reloaded.reset(seed=0)
    reloaded.act(obs)
    obs_t, goal_t, _ = reloaded.prepare_obs(obs)
    with torch.no_grad():
        draft = reloaded.constraints(obs_t, goal_t).apply(reloaded.draft(obs_t, reloaded.condition(obs_t, goal_t)))
    torch.testing.assert_close(reloaded.planner._plans, draft)
    bad = {**cfg, "policy": {**cfg["policy"], "horizon": 16}}
    with pytest.raises(ValueError, match="horizon"):
        train_policy(bad, tmp_path / "bad", dataset=maze_data, progress=False)


def test_near_optimal_controller_beats_the_waypoint_expert():
    card = get_task(TASK)
    opt = run_episodes(card, TimeOptimalController(get_maze(card)), episodes=4, seed=1000)
    expert = run_episodes(card, make_expert(card), episodes=4, seed=1000)
    assert (opt["first_hit"] >= 0).all()
    assert opt["first_hit"].mean() < 0.9 * expert["first_hit"].mean()
    assert opt["returns"].mean() > expert["returns"].mean()


def test_eval_reports_the_score_against_the_near_optimal_controller():
    card = get_task(TASK)
    controller = TimeOptimalController(get_maze(card))

    class Policy:
        kind = "near-optimal"

        def reset(self, mask=None):
            pass

        def act(self, obs):
            return controller.act(obs)

    report = evaluate(Policy(), TASK, episodes=3, num_envs=3, seed=0)
    optimal = card.extras["ref_optimal_score"]
    expect = 100 * (np.asarray(report.returns) - card.ref_min_score) / (optimal - card.ref_min_score)
    assert report.extra["optimal_normalized_mean"] == pytest.approx(expect.mean())
    assert "near-optimal controller" in report.summary()


def test_choose_steps_takes_the_fewest_within_one_standard_error_of_the_best():
    rows = [StepRow(1, 80.0, 2.0, 1, 1), StepRow(2, 94.5, 1.0, 2, 2), StepRow(5, 96.0, 2.0, 5, 5),
            StepRow(10, 95.0, 1.0, 9, 9)]
    assert choose_steps(rows) == 2  # 94.5 >= 96 - 2
    rows[1] = StepRow(2, 93.9, 1.0, 2, 2)
    assert choose_steps(rows) == 5


def test_tune_steps_writes_the_chosen_default_into_the_checkpoint(strided, tmp_path, capsys):
    _, out = strided
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(out / "checkpoints" / "step-00000020", ckpt)
    assert cli(["tune-steps", str(ckpt), "--steps", "1,2", "--episodes", "2", "--num-envs", "2"]) == 0
    text = capsys.readouterr().out
    record = json.loads((ckpt / "tune_steps.json").read_text())
    assert [r["steps"] for r in record["rows"]] == [1, 2] and record["field"] == "steps"
    chosen = record["chosen"]
    assert f"steps: {chosen} written" in text
    assert yaml.safe_load((ckpt / "config.yaml").read_text())["policy"]["steps"] == chosen
    assert diffplan.load_policy(ckpt).default_steps == chosen
    write_default_steps(ckpt, 7)
    assert diffplan.load_policy(ckpt).default_steps == 7
    assert cli(["tune-steps", str(ckpt), "--steps", "0,2"]) == 2  # a Diffuser plans with >= 1 step
    assert "diffuser step counts must be integers >= 1" in capsys.readouterr().err
