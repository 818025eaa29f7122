"""Truncated anchored action diffusion (DiffusionDrive-style): anchors, positives, inference cost,
multi-modality and checkpoints. Tiny models and synthetic data throughout."""
import numpy as np
import pytest
import torch

from diffplan.data.dataset import OfflineDataset
from diffplan.policies.anchored import (AnchoredConfig, AnchoredDiffusionPolicy, kmeans, nearest_anchor)
from diffplan.policies.base import SpaceSpec, load_policy
from diffplan.runtime.planner import PlannerConfig

torch.set_num_threads(1)

SPEC = SpaceSpec(obs_dim=4, act_dim=2, action_low=(-1.0, -1.0), action_high=(1.0, 1.0), goal_dim=2)


def tiny(**kw) -> AnchoredConfig:
    base = dict(chunk=4, num_anchors=4, width=32, heads=2, kmeans_iters=50,
                runtime=PlannerConfig(n_action_steps=4))
    base.update(kw)
    return AnchoredConfig(**base)


def blobs(n_per=200, k=5, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4.0, (k, dim))
    return np.concatenate([c + rng.normal(0, 0.3, (n_per, dim)) for c in centers]).astype(np.float32)


def bimodal_dataset(episodes=64, length=12, seed=0) -> OfflineDataset:
    """Same (near-zero) observation; half the episodes push +x, half push -x, whole episodes long."""
    rng = np.random.default_rng(seed)
    n = episodes * length
    sign = np.repeat(np.where(np.arange(episodes) % 2 == 0, 1.0, -1.0), length)
    actions = np.stack([0.8 * sign, np.zeros(n)], 1) + rng.normal(0, 0.05, (n, 2))
    timeouts = np.zeros(n, bool)
    timeouts[length - 1::length] = True
    return OfflineDataset(observations=rng.normal(0, 0.01, (n, 2)), actions=np.clip(actions, -1, 1),
                          rewards=np.zeros(n), terminals=np.zeros(n, bool), timeouts=timeouts)


def train(policy, dataset, steps=300, lr=2e-3):
    from diffplan.train import TrainConfig, Trainer

    cfg = TrainConfig(steps=steps, batch_size=64, lr=lr, warmup_steps=10, ema_decay=0.9,
                      progress=False, log_every=steps)
    return Trainer(policy, policy.batches(dataset, 64), cfg).fit().eval()


def test_anchors_are_the_kmeans_centroids_of_a_reference_kmeans():
    from sklearn.cluster import KMeans

    x = blobs()
    ours = kmeans(x, 5, seed=0).numpy()
    ref = KMeans(5, n_init=10, random_state=0).fit(x).cluster_centers_
    # same set of centroids, whatever the order
    d = np.linalg.norm(ours[:, None] - ref[None], axis=-1)
    assert sorted(d.argmin(1).tolist()) == list(range(5))
    assert d.min(1).max() < 1e-4
    # and the policy stores exactly these as its anchors (normalized chunks of length 4 x 2 dims)
    policy = AnchoredDiffusionPolicy(tiny(num_anchors=5), SPEC)
    policy.fit_anchors(torch.as_tensor(x).view(-1, 4, 2))
    assert torch.allclose(policy.anchors.flatten(1), torch.as_tensor(ours), atol=1e-5)
    assert "anchors" in policy.state_dict()


def test_kmeans_centroids_are_the_means_of_their_clusters():
    x = torch.as_tensor(blobs(k=7, seed=3))
    c = kmeans(x, 7, seed=1)
    assign = torch.cdist(x, c).argmin(1)
    for j in range(7):
        assert torch.allclose(c[j], x[assign == j].mean(0), atol=1e-5)


def test_positive_query_is_the_nearest_anchor():
    g = torch.Generator().manual_seed(0)
    anchors = torch.randn(6, 4, 2, generator=g)
    chunks = torch.randn(50, 4, 2, generator=g)
    brute = torch.stack([((chunks - a) ** 2).sum((1, 2)) for a in anchors], 1).argmin(1)
    assert torch.equal(nearest_anchor(chunks, anchors), brute)
    # the loss regresses the positive query: at (almost) no noise an untrained decoder returns its
    # noisy anchors, so a target equal to anchor j has ~zero L1 exactly when query j is the positive
    # (any other anchor is ~1 away per element)
    policy = AnchoredDiffusionPolicy(tiny(num_anchors=6, truncation=1e-6), SPEC)
    policy.anchors.copy_(anchors)
    j = torch.tensor([3, 0, 5, 5, 1])
    batch = {"obs": torch.zeros(5, 4), "goal": torch.zeros(5, 2), "actions": anchors[j]}
    _, logs = policy.loss(batch)  # identity normalizers: normalized target == anchor
    assert logs["l1_stage1"] < 0.05 and logs["l1_stage2"] < 0.05


def test_inference_uses_two_network_evaluations_per_cascade_stage():
    policy = AnchoredDiffusionPolicy(tiny(), SPEC).eval()
    calls = [0] * len(policy.net.stages)
    for s, stage in enumerate(policy.net.stages):
        stage.register_forward_hook(lambda m, a, o, s=s: calls.__setitem__(s, calls[s] + 1))
    obs = {"observation": np.zeros((3, 4), np.float32), "desired_goal": np.ones((3, 2), np.float32)}
    policy.reset(seed=0)
    policy.act(obs)
    assert calls == [2, 2]  # 2 DDIM steps, each one pass through both stages, for the whole batch
    for _ in range(3):  # the rest of the chunk comes from the action queue
        policy.act(obs)
    assert calls == [2, 2]
    policy.act(obs)
    assert calls == [4, 4]


def test_truncation_follows_the_anchor_spacing():
    policy = AnchoredDiffusionPolicy(tiny(truncation_ratio=0.5), SPEC)
    policy.fit_anchors(torch.as_tensor(blobs(k=4)).view(-1, 4, 2))
    t = policy.t_trunc
    nsr = policy.schedule.sigma(t) / policy.schedule.alpha(t)
    assert 0 < float(t) < 1
    assert nsr.item() == pytest.approx(0.5 * policy.anchor_spacing(), rel=1e-3)
    wider = AnchoredDiffusionPolicy(tiny(truncation_ratio=1.0), SPEC)
    wider.fit_anchors(torch.as_tensor(blobs(k=4)).view(-1, 4, 2))
    assert float(wider.t_trunc) > float(t)


def test_bimodal_data_gives_both_modes_not_their_average():
    data = bimodal_dataset()
    policy = AnchoredDiffusionPolicy.from_dataset(data, tiny(temperature=1.0))
    policy = train(policy, data)
    n = 200
    noise = torch.randn(n, 4, 2, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        chunks = policy.plan(torch.zeros(n, 2), None, noise)
    push = chunks[:, :, 0].mean(1)  # mean x action of each sampled chunk
    assert (push.abs() > 0.3).all(), "a chunk fell between the modes (their average is 0)"
    assert 0.2 < (push > 0).float().mean() < 0.8, "one mode was lost"
    # top-logit mode (temperature 0) is one of the modes too
    policy.config.temperature = 0.0
    with torch.inference_mode():
        top = policy.plan(torch.zeros(4, 2), None, noise[:4])
    assert (top[:, :, 0].mean(1).abs() > 0.3).all()


def test_load_policy_round_trip_gives_identical_actions(tmp_path):
    policy = AnchoredDiffusionPolicy(tiny(), SPEC)
    policy.fit_anchors(torch.randn(200, 4, 2))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    policy.eval().save(tmp_path / "ckpt")
    loaded = load_policy(tmp_path / "ckpt")
    assert isinstance(loaded, AnchoredDiffusionPolicy)
    assert torch.equal(loaded.anchors, policy.anchors) and torch.equal(loaded.t_trunc, policy.t_trunc)
    rng = np.random.default_rng(0)
    obs = {"observation": rng.normal(size=(5, 4)).astype(np.float32),
           "desired_goal": rng.normal(size=(5, 2)).astype(np.float32)}
    policy.reset(seed=7)
    loaded.reset(seed=7)
    for _ in range(6):
        a, b = policy.act(obs), loaded.act(obs)
        assert a.shape == (5, 2) and np.array_equal(a, b)
        assert (np.abs(a) <= 1).all()


def test_return_conditioning_picks_the_mode_that_earns_the_requested_return(tmp_path):
    """+x episodes earn reward 1 per step, -x episodes earn 0: asking for the data's high return
    gives +x chunks, asking for 0 gives -x chunks, from the same observation and noise."""
    data = bimodal_dataset()
    rewards = (data.actions[:, 0] > 0).astype(np.float64)
    data = OfflineDataset(observations=data.observations, actions=data.actions, rewards=rewards,
                          terminals=data.terminals, timeouts=data.timeouts)
    policy = AnchoredDiffusionPolicy.from_dataset(data, tiny(temperature=1.0, return_conditioned=True, discount=0.9))
    batch = policy.batches(data, 8)(0, np.random.default_rng(0))
    assert batch["rtg"].shape == (8,) and batch["rtg"].max() > 0
    policy = train(policy, data)
    noise = torch.randn(100, 4, 2, generator=torch.Generator().manual_seed(0))
    push = {}
    for target in (None, 0.0):  # None: 0.9 x the data's largest return (a +x episode's)
        policy.config.target_return = target
        with torch.inference_mode():
            push[target] = policy.plan(torch.zeros(100, 2), None, noise)[:, :, 0].mean(1)
    assert (push[None] > 0.3).float().mean() > 0.9, "high return asked, -x chunks returned"
    assert (push[0.0] < -0.3).float().mean() > 0.9, "zero return asked, +x chunks returned"
    # the condition travels with the checkpoint
    policy.config.target_return, policy.config.temperature = None, 0.0  # top logit: deterministic
    policy.save(tmp_path / "ckpt")
    loaded = load_policy(tmp_path / "ckpt")
    assert torch.equal(loaded.default_return, policy.default_return)
    with torch.inference_mode():
        assert torch.equal(loaded.plan(torch.zeros(100, 2), None, noise), policy.plan(torch.zeros(100, 2), None, noise))
    with pytest.raises(KeyError, match="rtg"):
        policy.loss({"obs": torch.zeros(2, 2), "actions": torch.zeros(2, 4, 2)})
