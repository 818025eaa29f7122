"""The in-sample critic (IQL Q and V) and reranking by Q: it learns a one-step bandit, saves and
loads like any checkpoint, and the anchored policy picks its candidates by Q when given one."""
import numpy as np
import pytest
import torch

from diffplan.config import ConfigError
from diffplan.data import OfflineDataset
from diffplan.policies.base import SpaceSpec, load_policy
from diffplan.policies.critic import Critic, CriticConfig, rerank

torch.set_num_threads(1)


def bandit_dataset(n=2048, seed=0) -> OfflineDataset:
    """One-step episodes: reward -|a - 0.5|, the action uniform in [-1, 1], terminal at once."""
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, (n, 1))
    obs = rng.normal(0, 1, (n, 2))
    return OfflineDataset(observations=obs, actions=actions, rewards=-np.abs(actions[:, 0] - 0.5),
                          terminals=np.ones(n, bool), timeouts=np.zeros(n, bool), next_observations=obs)


def train_critic(data, steps=400):
    from diffplan.train import TrainConfig, Trainer

    critic = Critic.from_dataset(data, CriticConfig(hidden=(32, 32), reward_scale=1.0))
    cfg = TrainConfig(steps=steps, batch_size=128, lr=3e-3, warmup_steps=10, ema_decay=0.0,
                      lr_schedule="constant", progress=False, log_every=steps)
    batches = critic.batches(data, 128)
    rng = np.random.default_rng(1)
    fixed = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in batches(0, rng).items()}
    before = float(critic.loss(fixed)[0].detach())
    critic = Trainer(critic, batches, cfg).fit().eval()
    return critic, before, float(critic.loss(fixed)[0].detach())


@pytest.fixture(scope="module")
def trained():
    return train_critic(bandit_dataset())


def test_critic_loss_decreases_and_q_ranks_the_better_action_higher(trained):
    critic, before, after = trained
    assert after < 0.5 * before
    obs = torch.zeros(3, 2)
    with torch.no_grad():
        q = critic.q_value(obs, torch.tensor([[0.5], [0.0], [-0.8]]))
    assert q[0] > q[1] > q[2]
    assert abs(float(q[0])) < 0.2  # Q(a = 0.5) ~ its reward 0 (a terminal step: no bootstrap)


def test_rerank_picks_the_highest_q_candidate_in_one_batched_call(trained):
    critic = trained[0]
    cands = torch.tensor([[[-0.9], [0.45], [0.1]], [[0.55], [-0.5], [1.0]]])
    assert rerank(critic, torch.zeros(2, 2), cands).tolist() == [1, 0]


def test_critic_saves_and_loads_as_a_checkpoint_and_does_not_act(trained, tmp_path):
    critic = trained[0]
    critic.save(tmp_path / "critic")
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))
    loaded = load_policy(tmp_path / "critic")
    a, s = torch.tensor([[0.3], [-0.2]]), torch.ones(2, 2)
    assert torch.equal(loaded.q_value(s, a), critic.q_value(s, a))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as under a policy's runtime dtype
        assert loaded.q_value(s, a).dtype == torch.float32
    with pytest.raises(ConfigError, match="does not act"):
        loaded.act(np.zeros(2, np.float32))


def test_critic_needs_next_observations():
    data = bandit_dataset(64).replace(next_observations=None)
    with pytest.raises(ConfigError, match="next_observations"):
        Critic.from_dataset(data, CriticConfig())


class StubCritic:
    """Q(s, a) = -|a_0 - preferred|: prefers one first action."""

    def __init__(self, preferred: float):
        self.preferred = preferred
        self.calls = 0

    def q_value(self, obs, actions):
        self.calls += 1
        assert obs.shape[:-1] == actions.shape[:-1]
        return -(actions[..., 0] - self.preferred).abs()


def test_anchored_reranks_its_denoised_chunks_by_q_of_the_first_action():
    from test_anchored import tiny
    from diffplan.policies.anchored import AnchoredDiffusionPolicy

    spec = SpaceSpec(obs_dim=4, act_dim=2, action_low=(-1.0, -1.0), action_high=(1.0, 1.0))
    torch.manual_seed(0)
    policy = AnchoredDiffusionPolicy(tiny(), spec).eval()
    policy.anchors.copy_(0.5 * torch.randn_like(policy.anchors))
    obs, noise = torch.randn(3, spec.obs_dim), torch.randn(3, *policy.plan_shape)
    with torch.no_grad():
        x0, logits = policy.denoise_anchors(obs, None, noise)
        firsts = policy.action_to_env(policy.action_normalizer.unnormalize(x0))[:, :, 0]
        target = firsts[:, 3, 0].clone()  # prefer, per env, the first action of query 3
        stub = StubCritic(target[:, None])
        policy.use_critic(stub)
        plans = policy.plan(obs, None, noise)
    assert stub.calls == 1
    expected = x0[torch.arange(3), rerank(stub, obs, firsts)]
    assert torch.allclose(plans, policy.action_normalizer.unnormalize(expected))
    assert torch.allclose(plans[:, 0, 0], policy.action_normalizer.unnormalize(x0[:, 3])[:, 0, 0])
    policy.use_critic(None)
    with torch.no_grad():
        default = policy.plan(obs, None, noise)
    assert torch.allclose(default, policy.action_normalizer.unnormalize(x0[torch.arange(3), logits.argmax(-1)]))


def test_anchored_config_critic_loads_the_checkpoint_and_refuses_others(trained, tmp_path):
    from test_anchored import tiny
    from diffplan.policies.anchored import AnchoredDiffusionPolicy
    from diffplan.policies.bc import BCConfig, BCPolicy

    spec = SpaceSpec(obs_dim=2, act_dim=1, action_low=(-1.0,), action_high=(1.0,))
    trained[0].save(tmp_path / "critic")
    BCPolicy(BCConfig(hidden=(8,)), spec).save(tmp_path / "bc")
    policy = AnchoredDiffusionPolicy(tiny(critic=str(tmp_path / "critic")), spec).eval()
    assert isinstance(policy.reranker(), Critic) and "critic" not in " ".join(policy.state_dict())
    assert policy.act(np.zeros(2, np.float32)).shape == (1,)
    policy = AnchoredDiffusionPolicy(tiny(critic=str(tmp_path / "bc")), spec).eval()
    with pytest.raises(ConfigError, match="holds a 'bc' checkpoint, not a critic"):
        policy.act(np.zeros(2, np.float32))
    wrong = SpaceSpec(obs_dim=3, act_dim=1, action_low=(-1.0,), action_high=(1.0,))
    policy = AnchoredDiffusionPolicy(tiny(critic=str(tmp_path / "critic")), wrong).eval()
    with pytest.raises(ConfigError, match="obs_dim, act_dim"):
        policy.act(np.zeros(3, np.float32))


def test_a_critic_fitted_on_other_data_is_refused_at_training_start_and_at_load(trained, tmp_path, monkeypatch):
    """Q is in-sample, so a critic trained on another task's data misranks the policy's candidates
    (a v0 critic on a v1 policy halved its score); training stops before its first step."""
    import copy
    import dataclasses

    from test_anchored import tiny
    from diffplan.config import to_dict
    from diffplan.policies.anchored import AnchoredDiffusionPolicy
    from diffplan.policies.training import train_policy

    critic = copy.deepcopy(trained[0])  # the module's fixture stays as it was
    critic.spec = dataclasses.replace(critic.spec, task="bandit-v0")
    critic.save(tmp_path / "critic")
    for task in ("bandit-v0", None):  # the same task, or a policy that names none: accepted
        spec = SpaceSpec(obs_dim=2, act_dim=1, action_low=(-1.0,), action_high=(1.0,), task=task)
        assert isinstance(AnchoredDiffusionPolicy(tiny(critic=str(tmp_path / "critic")), spec).reranker(), Critic)
    spec = SpaceSpec(obs_dim=2, act_dim=1, action_low=(-1.0,), action_high=(1.0,), task="bandit-v1")
    policy = AnchoredDiffusionPolicy(tiny(critic=str(tmp_path / "critic")), spec).eval()
    with pytest.raises(ConfigError, match="was trained on bandit-v0, the policy on bandit-v1"):
        policy.act(np.zeros(2, np.float32))
    cfg = {"kind": "anchored", "policy": to_dict(tiny(critic=str(tmp_path / "critic"), pad=True)),
           "train": {"steps": 5, "batch_size": 8, "progress": False}}
    data = dataclasses.replace(bandit_dataset(256), task="bandit-v1")
    # no env is registered for the bandit: its spec is the arrays' with the data's task name
    monkeypatch.setattr(SpaceSpec, "from_dataset", classmethod(lambda cls, d: dataclasses.replace(spec, task=d.task)))
    with pytest.raises(ConfigError, match="was trained on bandit-v0"):
        train_policy(cfg, tmp_path / "run", dataset=data)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_diffuser_keeps_the_candidate_plan_of_highest_q_of_the_first_action():
    from diffplan.policies.diffuser import DiffuserConfig, DiffuserPlanner

    torch.manual_seed(0)
    cfg = DiffuserConfig(horizon=8, with_actions=True, dim=8, dim_mults=(1, 2), steps=3, normalizer="gaussian",
                         action_mode="plan", n_samples=4, temperature=1.0)
    spec = SpaceSpec(obs_dim=3, act_dim=2, action_low=(-1.0, -1.0), action_high=(1.0, 1.0))
    policy = DiffuserPlanner(cfg, spec).eval()
    assert policy.noise_samples == 1  # no value net and no critic: one plan
    g = torch.Generator().manual_seed(0)
    obs, noise = torch.randn(2, 3, generator=g), torch.randn(2, 4, 8, 5, generator=g)
    with torch.inference_mode():
        cands = torch.stack([policy.plan(obs, None, noise[:, j]) for j in range(4)], 1)  # (B, n, H, D)
        firsts = policy.action_to_env(policy.normalizer.unnormalize(cands[:, :, 0])[..., 3:])
        stub = StubCritic(firsts[:, 2, :1].clone())  # prefers, per env, candidate 2's first action
        policy.use_critic(stub)
        assert policy.noise_samples == 4
        chosen = policy.plan(obs, None, noise)
    assert stub.calls == 1
    assert (cands[:, 0] - cands[:, 2]).abs().amax() > 1e-3
    torch.testing.assert_close(chosen, cands[:, 2], atol=1e-4, rtol=1e-4)


def test_trajectory_diffuser_refines_its_draft_n_times_and_keeps_the_plan_of_highest_q():
    from test_trajectory_diffuser import loco_dataset, tiny

    from diffplan.policies.trajectory_diffuser import TrajectoryDiffuser

    torch.manual_seed(0)
    data = loco_dataset()
    policy = TrajectoryDiffuser.from_dataset(data, tiny(action_mode="inverse", n_candidates=4, noise_draft=False)).eval()
    g = torch.Generator().manual_seed(0)
    obs, noise = torch.as_tensor(data.observations[[0, 60]]), torch.randn(2, 4, 16, 3, generator=g)
    with pytest.raises(ConfigError, match="needs a critic"):
        policy.plan(obs, None, noise)
    with torch.inference_mode():
        policy.config.n_candidates = 1  # each candidate alone: the draft refined from its noise, noised
        policy.config.noise_draft = True
        cands = torch.stack([policy.plan(obs, None, noise[:, j]) for j in range(4)], 1)  # (B, n, H, D)
        zero = torch.zeros(2, dtype=torch.long)
        firsts = torch.stack([policy.action_to_env(policy.action_at(cands[:, j], zero, obs, None))
                              for j in range(4)], 1)
        stub = StubCritic(firsts[:, 1, :1].clone())  # prefers, per env, candidate 1's first action
        policy.config.n_candidates, policy.config.noise_draft = 4, False  # candidates are noised regardless
        policy.use_critic(stub)
        chosen = policy.plan(obs, None, noise)
    assert stub.calls == 1  # one batched Q call for all envs and candidates
    assert (cands[:, 0] - cands[:, 1]).abs().amax() > 1e-3
    torch.testing.assert_close(chosen, cands[:, 1], atol=1e-4, rtol=1e-4)


def test_a_checkpoints_critic_path_is_found_beside_it_from_any_folder(tmp_path, monkeypatch):
    """A config names its critic repository-relative (checkpoints/<task>/critic); loaded from
    another working folder (an installed wheel, a user's scripts), it is found beside the policy's
    own checkpoint folder."""
    import shutil
    from pathlib import Path

    from diffplan.policies import load_policy

    root = Path(__file__).resolve().parents[1] / "checkpoints" / "halfcheetah-medium"
    repo = tmp_path / "repo" / "checkpoints" / "my-task"
    shutil.copytree(root / "anchored", repo / "anchored")
    shutil.copytree(root / "critic", repo / "critic")
    cfg = repo / "anchored" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("critic: checkpoints/halfcheetah-medium/critic",
                                           "critic: checkpoints/my-task/critic"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    policy = load_policy(repo / "anchored")
    assert policy.config.critic == "checkpoints/my-task/critic"
    critic = policy.reranker()
    assert critic is not None and critic.kind == "critic"
