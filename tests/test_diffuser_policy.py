"""The Diffuser planner end to end on a small maze dataset: train, save, load, act, evaluate."""
from pathlib import Path

import numpy as np
import pytest
import torch

import diffplan
from diffplan.config import ConfigError
from diffplan.envs import get_task
from diffplan.policies import DiffuserConfig, DiffuserPlanner, ObservationError
from diffplan.policies.training import check_config, read_config, train_policy
from diffplan.train import CheckpointError

TASK = "pointmaze-umaze"
TINY = {"horizon": 16, "dim": 8, "dim_mults": [1, 2], "steps": 4}


@pytest.fixture(scope="module")
def maze_data():
    return get_task(TASK).make_dataset(progress=False, steps=4000, seed=3)


@pytest.fixture(scope="module")
def trained(maze_data, tmp_path_factory):
    """A tiny Diffuser trained for a few dozen steps through the public training entry point."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("run")
    cfg = {"kind": "diffuser", "task": TASK, "policy": TINY,
           "train": {"steps": 40, "batch_size": 16, "warmup_steps": 5, "ckpt_every": 20, "progress": False}}
    policy = train_policy(cfg, out, dataset=maze_data, progress=False)
    return policy, out


def _obs(seed=0, batch=None):
    env = get_task(TASK).make_env()
    if batch is None:
        return env.reset(seed=seed)[0]
    obs = [env.reset(seed=seed + i)[0] for i in range(batch)]
    return {k: np.stack([o[k] for o in obs]) for k in obs[0]}


def test_training_writes_a_loadable_checkpoint_folder(trained):
    _, out = trained
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-00000020", "step-00000040"]
    files = {p.name for p in (out / "checkpoints" / "step-00000040").iterdir()}
    assert {"model.safetensors", "config.yaml", "optimizer.safetensors"} <= files


def test_planned_start_and_goal_equal_the_constraints(trained):
    policy, _ = trained
    obs = _obs(seed=1, batch=3)
    policy.reset(seed=0)
    policy.act(obs)
    states = policy.plan_states(policy.planner._plans).numpy()
    np.testing.assert_allclose(states[:, 0], obs["observation"], atol=1e-5)
    goal_state = np.concatenate([obs["desired_goal"], np.zeros((3, 2), np.float32)], axis=1)
    np.testing.assert_allclose(states[:, -1], goal_state, atol=1e-5)


def test_load_policy_round_trip_gives_identical_actions(trained, tmp_path):
    policy, out = trained
    loaded = diffplan.load_policy(out)  # a run folder resolves to its latest checkpoint
    assert isinstance(loaded, DiffuserPlanner)
    obs = _obs(seed=2)
    policy.reset(seed=5)
    loaded.reset(seed=5)
    for _ in range(3):
        np.testing.assert_array_equal(policy.act(obs), loaded.act(obs))
    policy.save(tmp_path / "saved")
    again = diffplan.load_policy(tmp_path / "saved")
    again.reset(seed=5)
    policy.reset(seed=5)
    np.testing.assert_array_equal(policy.act(obs), again.act(obs))


def test_actions_are_inside_the_action_space_for_single_and_batched_observations(trained):
    policy, _ = trained
    policy.reset(seed=0)
    a = policy.act(_obs(seed=3))
    assert a.shape == (2,) and policy.action_space.contains(a.astype(np.float32))
    policy.reset(seed=0)
    b = policy.act(_obs(seed=3, batch=4))
    assert b.shape == (4, 2) and np.all(np.abs(b) <= 1.0)


def test_warm_start_from_a_plan_keeps_it_at_small_t_warm(maze_data, tmp_path):
    # eps-prediction: at small t the denoiser is near the identity even for a barely trained net,
    # so this checks the warm-start plumbing (noise to t_warm, refine, re-impose constraints).
    torch.manual_seed(0)
    cfg = {"kind": "diffuser", "task": TASK, "policy": {**TINY, "objective": "eps"},
           "train": {"steps": 10, "batch_size": 8, "warmup_steps": 1, "progress": False}}
    policy = train_policy(cfg, tmp_path, dataset=maze_data, progress=False)
    obs = _obs(seed=4)
    o = torch.as_tensor(obs["observation"])[None]
    g = torch.as_tensor(obs["desired_goal"])[None]
    gen = torch.Generator().manual_seed(0)
    noise = lambda: torch.randn(1, *policy.plan_shape, generator=gen)
    with torch.inference_mode():
        first = policy.plan(o, g, noise())
        warm = policy.plan(o, g, noise(), warm=first, t_start=0.02, steps=2)
        cold = policy.plan(o, g, noise())
    assert (warm - first).abs().max() < 0.25 * (cold - first).abs().max()


def test_wrong_observations_get_clear_errors(trained):
    policy, _ = trained
    obs = _obs(seed=0)
    with pytest.raises(ObservationError, match="shape"):
        policy.act({**obs, "observation": np.zeros(3)})
    with pytest.raises(ObservationError, match="desired_goal"):
        policy.act({"observation": obs["observation"]})
    with pytest.raises(ObservationError, match="NaN"):
        policy.act({**obs, "observation": np.array([0.0, np.nan, 0.0, 0.0])})
    with pytest.raises(ObservationError, match="dict"):
        policy.act(obs["observation"])


def test_a_checkpoint_for_another_task_is_refused_naming_both(trained):
    _, out = trained
    with pytest.raises(ConfigError, match="pointmaze-umaze.*pointmaze-medium"):
        diffplan.load_policy(out, task="pointmaze-medium")
    from diffplan.eval import evaluate

    with pytest.raises(ValueError, match="pointmaze-umaze.*pointmaze-medium"):
        evaluate(diffplan.load_policy(out), "pointmaze-medium", episodes=1)


def test_a_truncated_model_file_gets_a_clear_error(trained, tmp_path):
    policy, _ = trained
    path = policy.save(tmp_path / "ckpt")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        diffplan.load_policy(path)


def test_unknown_config_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match="'horizn'"):
        from diffplan.config import from_dict

        from_dict(DiffuserConfig, {"horizn": 32}, "policy")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: diffuser\ntask: pointmaze-umaze\ntrian: {}\n")
    with pytest.raises(ConfigError, match="trian"):
        read_config(bad)
    with pytest.raises(ConfigError, match="kind"):
        check_config({"task": TASK})


def test_shipped_configs_parse():
    root = Path(__file__).resolve().parents[1] / "configs"
    from diffplan.config import from_dict
    from diffplan.policies.base import POLICIES

    paths = sorted(root.rglob("*.yaml"))
    assert paths
    for path in paths:
        cfg = read_config(path)
        from_dict(POLICIES[cfg["kind"]].Config, cfg.get("policy"), str(path))


def test_replanning_every_k_steps_replans_on_schedule(trained):
    policy, _ = trained
    cfg = policy.planner.config
    saved = cfg.n_action_steps
    cfg.n_action_steps = 4
    try:
        policy.reset(seed=0)
        obs = _obs(seed=5)
        counts = []
        for _ in range(8):
            before = policy.planner.num_plans
            policy.act(obs)
            counts.append(policy.planner.num_plans - before)
        assert counts == [1, 0, 0, 0, 1, 0, 0, 0]
    finally:
        cfg.n_action_steps = saved


def test_bf16_inference_stays_close_to_float32(trained):
    policy, _ = trained
    obs = _obs(seed=6)
    policy.reset(seed=1)
    a32 = policy.act(obs)
    policy.planner.config.dtype = "bfloat16"
    try:
        policy.reset(seed=1)
        a16 = policy.act(obs)
    finally:
        policy.planner.config.dtype = None
    assert a16.dtype == np.float32 and np.abs(a16 - a32).max() < 0.1


def test_batched_act_equals_per_env_act_with_the_same_seeds(trained):
    policy, _ = trained
    obs = _obs(seed=7, batch=3)
    policy.reset(seed=[20, 21, 22])
    batched = policy.act(obs)
    for i in range(3):
        policy.reset(seed=[20 + i])
        single = policy.act({k: v[i] for k, v in obs.items()})
        np.testing.assert_allclose(single, batched[i], atol=1e-4)


@pytest.mark.skipif(not (torch.cuda.is_available() or __import__("os").environ.get("DIFFPLAN_TEST_COMPILE")),
                    reason="torch.compile takes minutes on a small CPU; set DIFFPLAN_TEST_COMPILE=1 to run")
def test_compiled_planning_gives_the_same_actions(trained):
    policy, _ = trained
    obs = _obs(seed=8)
    policy.reset(seed=2)
    eager = policy.act(obs)
    policy.planner.config.compile = True
    try:
        policy.reset(seed=2)
        compiled = policy.act(obs)
    finally:
        policy.planner.config.compile = False
    np.testing.assert_allclose(compiled, eager, atol=1e-4)


def _value_guided_planner(**overrides):
    from diffplan.policies.base import SpaceSpec

    torch.manual_seed(0)
    cfg = DiffuserConfig(horizon=8, with_actions=True, dim=8, dim_mults=(1, 2), steps=3, normalizer="gaussian",
                         action_mode="plan", value_guided=True, guide_scale=0.5, **overrides)
    spec = SpaceSpec(obs_dim=3, act_dim=2, action_low=(-1.0, -1.0), action_high=(1.0, 1.0))
    policy = DiffuserPlanner(cfg, spec).eval()
    with torch.no_grad():  # an untrained value net is near constant: give it a slope to choose by
        policy.value.net[-1].weight.mul_(50)
    return policy


def test_temperature_0_plans_one_candidate_and_positive_temperature_keeps_the_best_of_n():
    assert _value_guided_planner(n_samples=8, temperature=0.0).noise_samples == 1  # all would be equal
    n = 4
    policy = _value_guided_planner(n_samples=n, temperature=1.0)
    assert policy.noise_samples == n
    g = torch.Generator().manual_seed(0)
    obs, noise = torch.randn(2, 3, generator=g), torch.randn(2, n, 8, 5, generator=g)
    with torch.inference_mode():
        chosen = policy.plan(obs, None, noise)
        policy.config.n_samples = 1  # the same candidates, planned one at a time
        cands = torch.stack([policy.plan(obs, None, noise[:, j]) for j in range(n)], 1)  # (B, n, H, D)
        values = policy.value(cands.flatten(0, 1), torch.zeros(2 * n)).view(2, n)
    assert (cands[:, 0] - cands[:, 1]).abs().amax() > 1e-3  # distinct noise, distinct plans
    torch.testing.assert_close(chosen, cands[torch.arange(2), values.argmax(1)], atol=1e-4, rtol=1e-4)


def test_termination_penalty_and_guide_variance_reach_the_value_windows_and_the_guidance(monkeypatch):
    from diffplan.data import OfflineDataset
    import diffplan.policies.diffuser as diffuser_module

    data = OfflineDataset(observations=np.zeros((12, 3)), actions=np.zeros((12, 2)), rewards=np.ones(12),
                          terminals=np.arange(12) == 11, timeouts=np.zeros(12, bool))
    values = {}
    for penalty in (None, -100.0):
        policy = _value_guided_planner(termination_penalty=penalty)
        values[penalty] = policy._windows(data)[11 - 8]["value"][0]  # 8 steps before the terminal one
    assert values[-100.0] == pytest.approx(values[None] - 100 * 0.997 ** 8, rel=1e-5)
    made = []
    real = diffuser_module.ValueGuidance
    monkeypatch.setattr(diffuser_module, "ValueGuidance", lambda *a, **k: made.append(k) or real(*a, **k))
    policy = _value_guided_planner(guide_variance=True)
    with torch.inference_mode():
        policy.plan(torch.zeros(1, 3), None, torch.randn(1, 64, 8, 5))
    assert made[0]["variance_scaled"] is True
