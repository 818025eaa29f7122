"""Goal hold: the synthesized "arrive and hold" continuation of goal-reaching episodes that the
action-chunk policies (anchored, Diffusion Policy, BC) train on. Synthetic point-mass data with
known linear dynamics, shaped like the maze recipe: every episode ends on the step that reaches
its goal, so no step shows the agent at rest on its goal."""
import numpy as np
import pytest
import torch

from diffplan.data.dataset import OfflineDataset
from diffplan.policies.anchored import AnchoredConfig, AnchoredDiffusionPolicy
from diffplan.data.goal_hold import GoalHoldConfig, fit_linear_dynamics, goal_hold_dataset
from diffplan.policies.base import load_policy
from diffplan.policies.bc import BCConfig, BCPolicy
from diffplan.policies.diffusion_policy import DiffusionPolicy, DiffusionPolicyConfig
from diffplan.runtime.planner import PlannerConfig

torch.set_num_threads(1)

# x' = x + 0.01 v + 0.002 a, v' = 0.99 v + 0.2 a: the maze's point mass, roughly
A = np.array([[1, 0, 0.01, 0], [0, 1, 0, 0.01], [0, 0, 0.99, 0], [0, 0, 0, 0.99]])
B = np.array([[0.002, 0], [0, 0.002], [0.2, 0], [0, 0.2]])


def step(s, a):
    return s @ A.T + a @ B.T


def reaching_dataset(episodes=12, seed=0, radius=0.45, last_reaches=False) -> OfflineDataset:
    """Noisy saturating PD runs from random starts to random goals, each cut on the step that
    comes within ``radius`` of its goal (reward 1 there); the last episode is cut short (no
    reward) unless ``last_reaches``."""
    rng = np.random.default_rng(seed)
    obs, acts, nxt, goals, rewards, timeouts = [], [], [], [], [], []
    s = np.zeros(4)
    for e in range(episodes):
        g = rng.uniform(-2, 2, 2)
        for t in range(400):
            a = np.clip(10 * (g - s[:2]) - s[2:] + 0.3 * rng.standard_normal(2), -1, 1)
            s2 = step(s, a)
            arrived = np.linalg.norm(s2[:2] - g) < radius
            cut = arrived or (e == episodes - 1 and not last_reaches and t == 20)
            obs.append(s), acts.append(a), nxt.append(s2), goals.append(g)
            rewards.append(float(arrived)), timeouts.append(cut)
            s = s2
            if cut:
                break
    n = len(obs)
    return OfflineDataset(observations=np.array(obs), actions=np.array(acts), rewards=np.array(rewards),
                          terminals=np.zeros(n, bool), timeouts=np.array(timeouts), goals=np.array(goals),
                          next_observations=np.array(nxt))


def test_linear_dynamics_fit_recovers_the_point_mass():
    data = reaching_dataset()
    w, rms = fit_linear_dynamics(data)
    assert rms < 1e-5
    np.testing.assert_allclose(w[:4].T, A, atol=1e-4)
    np.testing.assert_allclose(w[4:6].T, B, atol=1e-4)


def test_hold_appends_a_brake_and_hold_at_the_goal_to_every_goal_reaching_episode():
    data = reaching_dataset()
    assert (np.linalg.norm(data.observations[:, :2] - data.goals, axis=1) < 0.45).sum() == 0  # the problem
    hold = GoalHoldConfig(steps=150, kp=10.0, kd=1.0, noise=0.0)
    held = goal_hold_dataset(data, hold)
    lengths, new_lengths = data.episode_lengths, held.episode_lengths
    assert held.num_episodes == data.num_episodes
    np.testing.assert_array_equal(new_lengths[:-1], lengths[:-1] + 150)  # arrived: extended
    assert new_lengths[-1] == lengths[-1]  # cut short without reaching its goal: unchanged
    for e, (s0, n0) in enumerate(zip(data.episode_starts, lengths)):
        s1 = held.episode_starts[e]
        np.testing.assert_array_equal(held.observations[s1:s1 + n0], data.observations[s0:s0 + n0])
        np.testing.assert_array_equal(held.actions[s1:s1 + n0], data.actions[s0:s0 + n0])
        if e == data.num_episodes - 1:
            continue
        h = slice(s1 + n0, s1 + n0 + 150)
        o, a, g = held.observations[h], held.actions[h], held.goals[h]
        np.testing.assert_allclose(g, np.broadcast_to(data.goals[s0], g.shape))  # the episode's own goal
        np.testing.assert_allclose(o[0], data.next_observations[s0 + n0 - 1], atol=1e-6)  # continues from arrival
        # the actions are the PD law at each synthesized state, inside the action bounds
        np.testing.assert_allclose(a, np.clip(10 * (g - o[:, :2]) - o[:, 2:], -1, 1), atol=1e-5)
        # and the states follow the data's dynamics under those actions
        np.testing.assert_allclose(o[1:], step(o[:-1].astype(np.float64), a[:-1].astype(np.float64)), atol=1e-4)
        # it brakes (the first action opposes the arrival velocity) and ends at rest on the goal
        assert a[0] @ o[0, 2:] < 0
        assert np.linalg.norm(o[-1, :2] - g[-1]) < 0.05 and np.linalg.norm(o[-1, 2:]) < 0.2
        assert (np.linalg.norm(o[75:, :2] - g[75:], axis=1) < 0.05).all()  # and stays there


def test_hold_noise_is_seeded_and_clipped():
    data = reaching_dataset()
    a = goal_hold_dataset(data, GoalHoldConfig(steps=20, noise=0.5, seed=3))
    b = goal_hold_dataset(data, GoalHoldConfig(steps=20, noise=0.5, seed=3))
    c = goal_hold_dataset(data, GoalHoldConfig(steps=20, noise=0.5, seed=4))
    np.testing.assert_array_equal(a.actions, b.actions)
    assert not np.array_equal(a.actions, c.actions)
    assert np.abs(a.actions).max() <= 1.0


def test_bad_input_gives_clear_errors():
    data = reaching_dataset()
    with pytest.raises(ValueError, match="steps must be >= 0"):
        GoalHoldConfig(steps=-1)
    with pytest.raises(ValueError, match="goal dataset"):
        goal_hold_dataset(data.replace(goals=None), GoalHoldConfig(steps=4))
    with pytest.raises(ValueError, match="position"):
        goal_hold_dataset(data.replace(goals=np.zeros((len(data), 3))), GoalHoldConfig(steps=4))
    with pytest.raises(ValueError, match="positive reward"):
        goal_hold_dataset(data.replace(rewards=np.zeros(len(data))), GoalHoldConfig(steps=4))


def _policies(hold):
    kw = {"hold": hold}
    return [
        AnchoredDiffusionPolicy, AnchoredConfig(chunk=4, num_anchors=4, width=16, heads=2, kmeans_iters=10,
                                                runtime=PlannerConfig(n_action_steps=4), **kw),
        DiffusionPolicy, DiffusionPolicyConfig(horizon=8, dim=8, dim_mults=(1, 2), **kw),
        BCPolicy, BCConfig(hidden=(8,), **kw),
    ]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["anchored", "diffusion_policy", "bc"])
def test_every_action_policy_trains_on_hold_at_goal_windows(which):
    """Same sampler for all three: windows at rest on the goal, whose actions are the PD hold."""
    data = reaching_dataset()
    hold = GoalHoldConfig(steps=60)
    plain_cls, plain_cfg = _policies(GoalHoldConfig())[2 * which:2 * which + 2]
    cls, cfg = _policies(hold)[2 * which:2 * which + 2]
    rng = np.random.default_rng(0)

    def at_goal(policy):
        batch = policy.batches(data, 4000)(0, rng)
        d = np.linalg.norm(batch["obs"][:, :2] - batch["goal"], axis=1)
        return batch, d < 0.1

    batch, near = at_goal(cls.from_dataset(data, cfg))
    assert near.mean() > 0.2, "no hold-at-goal windows"
    first = batch["actions"] if batch["actions"].ndim == 2 else batch["actions"][:, 0]
    o, g = batch["obs"][near], batch["goal"][near]
    np.testing.assert_allclose(first[near], np.clip(10 * (g - o[:, :2]) - o[:, 2:], -1, 1), atol=1e-5)
    _, near_plain = at_goal(plain_cls.from_dataset(data, plain_cfg))
    assert near_plain.sum() == 0  # without the hold the data has none


def test_hold_config_travels_in_the_checkpoint(tmp_path):
    data = reaching_dataset()
    cls, cfg = _policies(GoalHoldConfig(steps=7, noise=0.25, seed=2))[:2]
    policy = cls.from_dataset(data, cfg)
    policy.eval().save(tmp_path / "ckpt")
    loaded = load_policy(tmp_path / "ckpt")
    assert loaded.config.hold == GoalHoldConfig(steps=7, noise=0.25, seed=2)
