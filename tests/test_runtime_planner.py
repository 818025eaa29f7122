"""The runtime's action queue, per-env resets, latency budget and batching, on stand-in planners."""
import time

import numpy as np
import pytest
import torch

from diffplan.runtime import Planner, PlannerConfig, shift_plans


class CountingPolicy:
    """Plans are noise + the observation; the action at step i is plan[i, 0]. Records every plan call."""

    plan_shape = (8, 2)
    default_steps = 4

    def __init__(self, per_step_ms: float = 0.0):
        self.calls = []
        self.per_step_ms = per_step_ms

    def plan(self, obs, goal, noise, *, warm=None, t_start=1.0, steps=None, generator=None):
        self.calls.append({"batch": obs.shape[0], "warm": warm, "t_start": t_start, "steps": steps})
        if self.per_step_ms:
            time.sleep(self.per_step_ms * steps / 1e3)
        base = warm if warm is not None else noise
        return base + obs[:, None, :1]

    def action_at(self, plans, index, obs, goal):
        return plans[torch.arange(plans.shape[0]), index.clamp(max=plans.shape[1] - 1)]


def test_queue_executes_exactly_n_action_steps_before_replanning():
    policy = CountingPolicy()
    planner = Planner(policy, PlannerConfig(n_action_steps=3, seed=0))
    obs = torch.zeros(1, 2)
    replanned = []
    for _ in range(9):
        planner.act(obs)
        replanned.append(planner.last_steps > 0)
    assert replanned == [True, False, False] * 3
    assert len(policy.calls) == 3


def test_actions_follow_the_plan_in_order():
    policy = CountingPolicy()
    planner = Planner(policy, PlannerConfig(n_action_steps=4, seed=1))
    obs = torch.zeros(1, 2)
    actions = [planner.act(obs) for _ in range(4)]
    plan = planner._plans[0]
    for i, a in enumerate(actions):
        torch.testing.assert_close(a[0], plan[i])


def test_reset_mask_clears_only_the_masked_envs():
    policy = CountingPolicy()
    planner = Planner(policy, PlannerConfig(n_action_steps=5, seed=0))
    obs = torch.zeros(3, 2)
    planner.act(obs)
    before = planner._plans.clone()
    planner.reset(np.array([False, True, False]))
    planner.act(obs)
    assert policy.calls[-1]["batch"] == 1  # only env 1 replanned
    torch.testing.assert_close(planner._plans[[0, 2]], before[[0, 2]])
    assert not torch.equal(planner._plans[1], before[1])
    assert list(planner._index) == [2, 1, 2]


def test_reset_mask_of_wrong_length_is_refused():
    planner = Planner(CountingPolicy(), PlannerConfig(seed=0))
    planner.act(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="3 entries"):
        planner.reset([True, False, True])


def test_warm_start_passes_the_shifted_previous_plan_at_t_warm():
    policy = CountingPolicy()
    planner = Planner(policy, PlannerConfig(n_action_steps=2, warm_start=True, t_warm=0.2, warm_steps=2, seed=0))
    obs = torch.zeros(1, 2)
    planner.act(obs)
    first = planner._plans.clone()
    planner.act(obs)
    planner.act(obs)  # replans warm
    call = policy.calls[-1]
    assert call["t_start"] == 0.2 and call["steps"] == 2
    torch.testing.assert_close(call["warm"], shift_plans(first, torch.tensor([2])))


def test_shift_plans_moves_the_unexecuted_part_forward_and_holds_the_end():
    plans = torch.arange(5.0).view(1, 5, 1).repeat(2, 1, 1)
    out = shift_plans(plans, torch.tensor([2, 0]))
    assert out[0, :, 0].tolist() == [2, 3, 4, 4, 4]
    assert out[1, :, 0].tolist() == [0, 1, 2, 3, 4]


def test_batched_act_equals_per_env_act_with_the_same_seeds():
    cfg = PlannerConfig(n_action_steps=3)
    obs = torch.tensor([[0.5, 0.0], [-1.0, 0.0], [2.0, 0.0]])
    batched = Planner(CountingPolicy(), cfg)
    batched.reset(seed=[10, 11, 12])
    singles = [Planner(CountingPolicy(), cfg) for _ in range(3)]
    for i, p in enumerate(singles):
        p.reset(seed=[10 + i])
    for _ in range(7):
        a = batched.act(obs)
        for i, p in enumerate(singles):
            torch.testing.assert_close(p.act(obs[i:i + 1])[0], a[i])


def test_same_seed_gives_the_same_plans_and_other_seeds_differ():
    def first_plan(seed):
        planner = Planner(CountingPolicy(), PlannerConfig())
        planner.reset(seed=seed)
        planner.act(torch.zeros(1, 2))
        return planner._plans.clone()

    torch.testing.assert_close(first_plan(3), first_plan(3))
    assert not torch.equal(first_plan(3), first_plan(4))


def test_budget_never_exceeds_the_steps_that_fit_the_measured_cost():
    policy = CountingPolicy(per_step_ms=2.0)
    planner = Planner(policy, PlannerConfig(n_action_steps=1, seed=0, max_steps=50))
    obs = torch.zeros(1, 2)
    for budget in (5.0, 11.0, 25.0):
        planner.act(obs, budget_ms=budget)
        fixed, per_step = planner._cost[(1, False)]
        assert planner.last_steps <= max(1, int((budget - fixed) // per_step))
        assert planner.last_steps >= 1
    assert policy.calls[-1]["steps"] > policy.calls[-3]["steps"]  # a bigger budget buys more steps


def test_latency_is_recorded_per_call():
    planner = Planner(CountingPolicy(), PlannerConfig(seed=0))
    for _ in range(5):
        planner.act(torch.zeros(2, 2))
    stats = planner.latency_stats()
    assert len(planner.latencies_ms) == 5 and stats["p99_ms"] >= stats["p50_ms"] > 0


def test_invalid_config_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="n_action_steps"):
        PlannerConfig(n_action_steps=0)
    with pytest.raises(ValueError, match="t_warm"):
        PlannerConfig(t_warm=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_planner_runs_on_cuda():
    planner = Planner(CountingPolicy(), PlannerConfig(seed=0))
    a = planner.act(torch.zeros(4, 2, device="cuda"))
    assert a.device.type == "cuda"


def test_unknown_inference_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype"):
        PlannerConfig(dtype="float8")


class CandidatePolicy(CountingPolicy):
    """Plans n candidates per env: the runtime must hand it (B, n, H, D) noise."""

    noise_samples = 3

    def plan(self, obs, goal, noise, *, warm=None, t_start=1.0, steps=None, generator=None):
        self.calls.append({"noise": noise.clone()})
        return noise[:, 0] + obs[:, None, :1]


def test_candidate_noise_comes_from_each_envs_own_generator():
    policy = CandidatePolicy()
    planner = Planner(policy, PlannerConfig(seed=0))
    planner.act(torch.zeros(2, 2))
    noise = policy.calls[-1]["noise"]
    assert noise.shape == (2, 3, 8, 2)
    for i in range(2):  # env i's generator is seeded seed + i and draws all its candidates
        expected = torch.randn(3, 8, 2, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(noise[i], expected)
    assert not torch.equal(noise[0, 0], noise[0, 1])
