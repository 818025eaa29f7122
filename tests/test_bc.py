"""Behaviour cloning baseline: averages modes, one evaluation per decision, checkpoints."""
import numpy as np
import torch

from diffplan.policies.base import SpaceSpec, load_policy
from diffplan.policies.bc import BCConfig, BCPolicy

from test_anchored import bimodal_dataset, train

torch.set_num_threads(1)


def test_bc_averages_the_modes_of_bimodal_data():
    data = bimodal_dataset()
    policy = train(BCPolicy.from_dataset(data, BCConfig(hidden=(32, 32))), data)
    a = policy.act(np.zeros((50, 2), np.float32))
    assert np.abs(a[:, 0]).max() < 0.3  # the mean of +0.8 and -0.8, not either mode


def test_bc_replans_every_step_with_one_network_evaluation():
    spec = SpaceSpec(obs_dim=3, act_dim=2, action_low=(-1.0, -1.0), action_high=(1.0, 1.0))
    policy = BCPolicy(BCConfig(hidden=(16,)), spec).eval()
    calls = []
    policy.net.register_forward_hook(lambda *a: calls.append(1))
    for _ in range(5):
        policy.act(np.zeros(3, np.float32))
    assert len(calls) == 5


def test_bc_load_policy_round_trip(tmp_path):
    spec = SpaceSpec(obs_dim=4, act_dim=2, action_low=(-1.0, -1.0), action_high=(1.0, 1.0), goal_dim=2)
    policy = BCPolicy(BCConfig(hidden=(16, 16)), spec)
    policy.action_normalizer.fit(np.random.default_rng(0).normal(size=(100, 2)))
    policy.eval().save(tmp_path / "bc")
    loaded = load_policy(tmp_path / "bc")
    obs = {"observation": np.ones((3, 4), np.float32), "desired_goal": np.zeros((3, 2), np.float32)}
    assert np.array_equal(policy.act(obs), loaded.act(obs))
