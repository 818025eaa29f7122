"""Policies on locomotion data: the value-guided [obs, action] Diffuser and BC, trained for a few
steps on a tiny hopper dataset rolled out from stand-in actors, then planned, acted and evaluated
on 1000-step-protocol task cards (shortened here)."""

import numpy as np
import pytest
import torch

from diffplan.envs import get_task
from diffplan.envs import locomotion as L
from diffplan.eval import evaluate
from diffplan.policies.training import train_policy

from test_locomotion_datasets import _write_snapshots

TINY_DIFFUSER = {"horizon": 8, "with_actions": True, "dim": 8, "dim_mults": [1, 2], "steps": 3,
                 "normalizer": "gaussian", "pad": True, "action_mode": "plan",
                 "value_guided": True, "discount": 0.99, "n_samples": 4, "guide_scale": 0.1,
                 "runtime": {"n_action_steps": 1}}
TRAIN = {"steps": 30, "batch_size": 16, "warmup_steps": 5, "ckpt_every": 30, "progress": False}


@pytest.fixture(scope="module")
def hopper_data(tmp_path_factory):
    root = _write_snapshots(tmp_path_factory.mktemp("behavior"))
    return L.make_dataset("hopper", "medium", steps=3000, num_envs=4, progress=False, root=root)


@pytest.fixture(scope="module")
def diffuser(hopper_data, tmp_path_factory):
    torch.manual_seed(0)
    cfg = {"kind": "diffuser", "task": "hopper-medium", "policy": TINY_DIFFUSER, "train": TRAIN}
    return train_policy(cfg, tmp_path_factory.mktemp("run"), dataset=hopper_data, progress=False)


def _obs(batch):
    env = get_task("hopper-medium").make_env()
    obs = np.stack([env.reset(seed=i)[0] for i in range(batch)]).astype(np.float32)
    env.close()
    return obs


def test_the_diffuser_plans_obs_and_actions_with_gaussian_normalization(diffuser, hopper_data):
    assert diffuser.plan_shape == (8, 11 + 3)
    x = np.concatenate([hopper_data.observations, hopper_data.actions], 1)
    norm = diffuser.normalizer.normalize(torch.as_tensor(x[:4000]))
    assert norm.mean(0).abs().max() < 1e-3 and (norm.std(0) - 1).abs().max() < 1e-2
    # the value targets are scaled into [-1, 1] by the largest |discounted return| of the data
    assert diffuser.value_scale.item() > 1.0


def test_plans_start_at_the_observation_and_act_with_their_first_action(diffuser):
    obs = torch.as_tensor(_obs(5))
    noise = torch.randn(5, *diffuser.plan_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plans = diffuser.plan(obs, None, noise)
        raw = diffuser.normalizer.unnormalize(plans)
        torch.testing.assert_close(raw[:, 0, :11], obs, atol=1e-4, rtol=1e-4)
        first = diffuser.action_at(plans, torch.zeros(5, dtype=torch.long), obs, None)
    torch.testing.assert_close(first, raw[:, 0, 11:])
    diffuser.reset(seed=0)
    act = diffuser.act(obs.numpy())
    assert act.shape == (5, 3) and np.all(np.abs(act) <= 1.0)


def test_value_guidance_and_the_best_of_n_choice_raise_the_plans_value(diffuser):
    obs = torch.as_tensor(_obs(16))
    noise = torch.randn(16, *diffuser.plan_shape, generator=torch.Generator().manual_seed(1))
    cfg = diffuser.config
    old = (cfg.n_samples, cfg.guide_scale)
    try:
        with torch.inference_mode():
            zeros = torch.zeros(16)
            cfg.n_samples, cfg.guide_scale = 1, 0.0
            torch.manual_seed(0)
            plain = diffuser.value(diffuser.plan(obs, None, noise), zeros)
            cfg.n_samples, cfg.guide_scale = 8, 0.0
            torch.manual_seed(0)
            best = diffuser.value(diffuser.plan(obs, None, noise), zeros)
            cfg.n_samples, cfg.guide_scale = 1, 1.0
            torch.manual_seed(0)
            guided = diffuser.value(diffuser.plan(obs, None, noise), zeros)
    finally:
        cfg.n_samples, cfg.guide_scale = old
    # the first of the n candidates is the plain plan, so the best is never worse
    assert torch.all(best >= plain - 1e-6) and best.mean() > plain.mean()
    assert guided.mean() > plain.mean()


def test_bc_trains_and_evaluation_scores_episodes_with_d4rl_references(hopper_data, tmp_path):
    torch.manual_seed(0)
    cfg = {"kind": "bc", "task": "hopper-medium", "policy": {"hidden": [16, 16]}, "train": TRAIN}
    policy = train_policy(cfg, tmp_path, dataset=hopper_data, progress=False)
    card = get_task("hopper-medium").replace(episode_steps=40)  # the protocol, shortened
    report = evaluate(policy, card, episodes=3, num_envs=2, seed=0)
    assert report.episodes == 3 and all(1 <= n <= 40 for n in report.lengths)
    lo, hi = L.D4RL_REF["hopper"]
    expected = 100 * (np.asarray(report.returns) - lo) / (hi - lo)
    assert report.normalized_mean == pytest.approx(expected.mean())
    assert report.normalized_stderr == pytest.approx(expected.std(ddof=1) / np.sqrt(3))


def test_the_card_eval_protocol_is_1000_steps_with_d4rl_references():
    card = get_task("halfcheetah-medium")
    env = card.make_env()
    assert env.spec.max_episode_steps == 1000 == card.episode_steps
    env.close()
    assert (card.ref_min_score, card.ref_max_score) == L.D4RL_REF["halfcheetah"]


def test_value_guided_plans_are_reproducible_per_env_whatever_the_batch(diffuser):
    obs = _obs(3)
    diffuser.reset(seed=5)
    first = diffuser.act(obs)
    torch.manual_seed(123)  # the global RNG must not matter
    diffuser.reset(seed=5)
    again = diffuser.act(obs)
    np.testing.assert_array_equal(first, again)
    diffuser.reset(seed=6)  # env 1 of a batch seeded 5 gets seed 6, as a single env here
    single = diffuser.act(obs[1:2])
    np.testing.assert_allclose(single[0], first[1], atol=1e-5)


def test_temperature_scales_the_start_noise_and_zero_plans_deterministically(diffuser):
    obs = torch.as_tensor(_obs(4))
    g = torch.Generator().manual_seed(2)
    n1, n2 = (torch.randn(4, *diffuser.plan_shape, generator=g) for _ in range(2))
    cfg = diffuser.config
    old = (cfg.n_samples, cfg.guide_scale, cfg.temperature)
    try:
        with torch.inference_mode():
            cfg.n_samples, cfg.guide_scale = 1, 0.0
            cfg.temperature = 0.5
            half = diffuser.plan(obs, None, n1)
            cfg.temperature = 1.0
            torch.testing.assert_close(half, diffuser.plan(obs, None, 0.5 * n1))
            assert (diffuser.plan(obs, None, n2) - diffuser.plan(obs, None, n1)).abs().max() > 1e-2
            cfg.temperature, cfg.n_samples, cfg.guide_scale = 0.0, 8, 0.1  # value guidance on
            assert diffuser.noise_samples == 1  # equal candidates are not planned 8 times
            torch.testing.assert_close(diffuser.plan(obs, None, n1), diffuser.plan(obs, None, n2))
    finally:
        cfg.n_samples, cfg.guide_scale, cfg.temperature = old
    with pytest.raises(ValueError, match="temperature"):
        type(cfg)(temperature=-0.1)


def test_value_guidance_at_the_default_scale_raises_the_plans_value(diffuser):
    """V learns return / value_scale, so guide_scale is in those units: the default moves plans up
    the value net, while Diffuser's raw-return 0.1 barely moves them."""
    from diffplan.policies.diffuser import DiffuserConfig

    obs = torch.as_tensor(_obs(6))
    noise = torch.zeros(6, *diffuser.plan_shape)
    cfg = diffuser.config
    old = (cfg.guide_scale, cfg.temperature)
    values = {}
    try:
        cfg.temperature = 0.0
        for scale in (0.0, 0.1, DiffuserConfig.guide_scale):
            cfg.guide_scale = scale
            with torch.inference_mode():
                plans = diffuser.plan(obs, None, noise)
                values[scale] = diffuser.value(plans, torch.zeros(6)).mean().item()
    finally:
        cfg.guide_scale, cfg.temperature = old
    gain_default = values[DiffuserConfig.guide_scale] - values[0.0]
    gain_small = values[0.1] - values[0.0]
    assert gain_default > 0
    assert abs(gain_small) < 0.2 * gain_default


def test_device_side_batches_are_windows_of_the_dataset_and_train_the_diffuser(diffuser, hopper_data, tmp_path):
    """train.data_on_device: the Diffuser's batches are drawn and gathered by torch on the training
    device (here the CPU), are real windows of the data, and train; host-only samplers say so."""
    from diffplan.config import ConfigError

    sample = diffuser.batches(hopper_data, 16, device="cpu")
    assert sample.device_side
    torch.manual_seed(3)
    b = sample(0, None)
    idx = torch.randint(len(diffuser._windows(hopper_data)), (16,), generator=torch.Generator().manual_seed(3))
    host = diffuser._windows(hopper_data).get_batch(idx.numpy())
    np.testing.assert_array_equal(b["x"].numpy(), np.concatenate([host["observations"], host["actions"]], -1))
    np.testing.assert_array_equal(b["value"].numpy(), host["value"])
    torch.manual_seed(0)
    cfg = {"kind": "diffuser", "task": "hopper-medium", "policy": TINY_DIFFUSER,
           "train": {**TRAIN, "data_on_device": True}}
    policy = train_policy(cfg, tmp_path / "dev", dataset=hopper_data, progress=False)
    assert policy.plan_shape == diffuser.plan_shape
    with pytest.raises(ConfigError, match="a bc policy draws its batches on the host.*diffuser"):
        train_policy({"kind": "bc", "task": "hopper-medium", "policy": {"hidden": [16]},
                      "train": {**TRAIN, "data_on_device": True}}, tmp_path / "bc", dataset=hopper_data)
