"""Diffusion Policy baseline (Chi et al.): chunk shapes, DDIM cost, training signal, checkpoints."""
import numpy as np
import torch

from diffplan.policies.base import SpaceSpec, load_policy
from diffplan.policies.diffusion_policy import DiffusionPolicy, DiffusionPolicyConfig
from diffplan.runtime.planner import PlannerConfig

torch.set_num_threads(1)

SPEC = SpaceSpec(obs_dim=4, act_dim=2, action_low=(-1.0, -1.0), action_high=(1.0, 1.0), goal_dim=2)


def tiny(**kw):
    base = dict(horizon=8, dim=8, dim_mults=(1, 2), steps=10, runtime=PlannerConfig(n_action_steps=4))
    base.update(kw)
    return DiffusionPolicyConfig(**base)


def obs_batch(b=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"observation": rng.normal(size=(b, 4)).astype(np.float32),
            "desired_goal": rng.normal(size=(b, 2)).astype(np.float32)}


def test_ddim_plan_costs_ten_network_evaluations_and_runs_n_action_steps():
    policy = DiffusionPolicy(tiny(), SPEC).eval()
    calls = []
    policy.net.register_forward_hook(lambda *a: calls.append(1))
    obs = obs_batch()
    policy.reset(seed=0)
    a = policy.act(obs)
    assert a.shape == (3, 2) and (np.abs(a) <= 1).all()
    assert len(calls) == 10
    for _ in range(3):
        policy.act(obs)
    assert len(calls) == 10  # the queue serves the rest of the executed actions
    policy.act(obs)
    assert len(calls) == 20


def test_training_reduces_the_denoising_loss():
    from diffplan.train import TrainConfig, Trainer

    rng = np.random.default_rng(0)

    def batches(step, r):
        obs = r.normal(size=(32, 4)).astype(np.float32)
        actions = np.repeat(np.tanh(obs[:, None, :2]), 8, axis=1)  # chunk determined by obs
        return {"obs": obs, "goal": r.normal(size=(32, 2)).astype(np.float32), "actions": actions}

    policy = DiffusionPolicy(tiny(), SPEC)
    torch.manual_seed(0)
    fixed = {k: torch.as_tensor(v) for k, v in batches(0, rng).items()}
    before = np.mean([policy.loss(fixed)[0].item() for _ in range(20)])
    Trainer(policy, batches, TrainConfig(steps=150, lr=3e-3, warmup_steps=5, ema_decay=0.0,
                                         progress=False, log_every=150)).fit()
    after = np.mean([policy.loss(fixed)[0].item() for _ in range(20)])
    assert after < 0.7 * before


def test_load_policy_round_trip_gives_identical_actions(tmp_path):
    policy = DiffusionPolicy(tiny(), SPEC)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.eval().save(tmp_path / "dp")
    loaded = load_policy(tmp_path / "dp")
    assert isinstance(loaded, DiffusionPolicy)
    obs = obs_batch(4, seed=1)
    policy.reset(seed=3)
    loaded.reset(seed=3)
    for _ in range(5):
        assert np.array_equal(policy.act(obs), loaded.act(obs))


def test_x0_clipping_keeps_sampled_chunks_inside_the_action_space():
    """At t = 1 the cosine schedule has alpha ~ 5e-5: without Chi et al.'s clip_sample, an
    untrained network's epsilon error becomes x0 estimates of hundreds."""
    spec = SpaceSpec(obs_dim=3, act_dim=2, action_low=(-1.0, -1.0), action_high=(1.0, 1.0))
    torch.manual_seed(0)
    clipped = DiffusionPolicy(DiffusionPolicyConfig(horizon=8, dim=8, dim_mults=(1, 2)), spec).eval()
    raw = DiffusionPolicy(DiffusionPolicyConfig(horizon=8, dim=8, dim_mults=(1, 2), clip_x0=False), spec).eval()
    raw.load_state_dict(clipped.state_dict())
    obs, noise = torch.randn(16, 3), torch.randn(16, 8, 2)
    with torch.inference_mode():
        a = clipped.plan(obs, None, noise)
        b = raw.plan(obs, None, noise)
    assert a.abs().max() <= 1.0 + 1e-5
    assert b.abs().max() > 10.0
