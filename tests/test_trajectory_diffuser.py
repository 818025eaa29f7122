"""TrajectoryDiffuser: drafting, truncated refinement, conditioning, training and checkpoints.
Tiny networks and synthetic data throughout."""
import numpy as np
import pytest
import torch

from diffplan.data.dataset import OfflineDataset
from diffplan.policies import POLICIES
from diffplan.policies.base import SpaceSpec, load_policy
from diffplan.policies.diffuser import window_constraints
from diffplan.policies.trajectory_diffuser import (
    TrajectoryDiffuser,
    TrajectoryDiffuserConfig,
)
from diffplan.runtime.planner import PlannerConfig

torch.set_num_threads(1)

H = 16
MAZE = SpaceSpec(obs_dim=4, act_dim=2, action_low=(-1.0, -1.0), action_high=(1.0, 1.0), goal_dim=2)
LOCO = SpaceSpec(obs_dim=3, act_dim=2, action_low=(-1.0, -1.0), action_high=(1.0, 1.0))


def tiny(**kw) -> TrajectoryDiffuserConfig:
    base = {"horizon": H, "dim": 8, "dim_mults": (1, 2), "draft_width": 16, "draft_depth": 2, "draft_heads": 2,
                "inverse_hidden": 16, "refine_steps": 2, "t_start": 0.5}
    base.update(kw)
    return TrajectoryDiffuserConfig(**base)


def maze_dataset(episodes=12, length=20, seed=0) -> OfflineDataset:
    """Point masses moving straight from a random start to a random goal, then resting."""
    rng = np.random.default_rng(seed)
    obs, act, goals = [], [], []
    for _ in range(episodes):
        start, goal = rng.uniform(-1, 1, 2), rng.uniform(-1, 1, 2)
        frac = np.minimum(np.arange(length) / (length // 2), 1.0)[:, None]
        pos = start + frac * (goal - start)
        vel = np.gradient(pos, axis=0)
        obs.append(np.concatenate([pos, vel], 1))
        act.append(np.clip(vel * 5, -1, 1))
        goals.append(np.repeat(goal[None], length, 0))
    n = episodes * length
    timeouts = np.zeros(n, bool)
    timeouts[length - 1::length] = True
    return OfflineDataset(observations=np.concatenate(obs), actions=np.concatenate(act), rewards=np.zeros(n),
                          terminals=np.zeros(n, bool), timeouts=timeouts, goals=np.concatenate(goals))


def loco_dataset(n=200, seed=0) -> OfflineDataset:
    rng = np.random.default_rng(seed)
    timeouts = np.zeros(n, bool)
    timeouts[49::50] = True
    return OfflineDataset(observations=rng.normal(size=(n, 3)), actions=rng.uniform(-1, 1, (n, 2)),
                          rewards=rng.uniform(0, 1, n), terminals=np.zeros(n, bool), timeouts=timeouts)


def maze_policy(**kw) -> TrajectoryDiffuser:
    torch.manual_seed(0)
    return TrajectoryDiffuser.from_dataset(maze_dataset(), tiny(**kw)).eval()


def obs_goal(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 4, generator=g) - 0.5, torch.rand(batch, 2, generator=g) - 0.5


def test_registered_under_its_kind():
    assert POLICIES["trajectory_diffuser"] is TrajectoryDiffuser


@pytest.mark.parametrize("stride", [1, 3, 5])
def test_incremental_drafting_equals_full_recomputation(stride):
    policy = maze_policy(draft_stride=stride)
    obs, goal = obs_goal()
    cond = policy.condition(obs, goal)
    with torch.no_grad():
        draft = policy.draft(obs, cond)
        # reference: rerun the whole sequence without a cache for every new token
        keys = policy.normalizer.normalize(obs)[:, None]
        states = [keys]
        for _ in range(policy.draft_tokens):
            out = policy.drafter(keys, cond)[:, -1:]
            chunk = keys[:, -1:] + out.view(2, stride, 4)
            states.append(chunk)
            keys = torch.cat([keys, chunk[:, -1:]], 1)
    assert draft.shape == (2, H, 4)
    torch.testing.assert_close(draft, torch.cat(states, 1)[:, :H], rtol=1e-5, atol=1e-5)


def test_drafter_predictions_never_depend_on_later_states():
    policy = maze_policy(draft_stride=2)
    x = policy.normalizer.normalize(torch.randn(1, 8, 4))
    cond = torch.randn(1, 2)
    base = policy.drafter(x, cond)
    x[:, 5] += 3.0
    torch.testing.assert_close(policy.drafter(x, cond)[:, :5], base[:, :5], rtol=0, atol=1e-6)


def test_k0_returns_the_draft_with_start_and_goal_imposed():
    policy = maze_policy()
    obs, goal = obs_goal()
    plans = policy.plan(obs, goal, torch.randn(2, H, 4), steps=0)
    draft = policy.draft(obs, policy.condition(obs, goal))
    torch.testing.assert_close(plans[:, 1:-1], draft[:, 1:-1])
    states = policy.plan_states(plans)
    torch.testing.assert_close(states[:, 0], obs, rtol=1e-5, atol=1e-5)
    rest = torch.cat([goal, torch.zeros(2, 2)], 1)
    torch.testing.assert_close(states[:, -1], rest, rtol=1e-5, atol=1e-5)


def test_refinement_from_t_start_1_with_many_steps_does_not_depend_on_the_draft(monkeypatch):
    policy = maze_policy()
    obs, goal = obs_goal()
    noise = torch.randn(2, H, 4, generator=torch.Generator().manual_seed(1))
    out = []
    for scale in (0.0, 5.0):
        monkeypatch.setattr(policy, "draft", lambda o, c, s=scale: torch.full((2, H, 4), s))
        out.append(policy.plan(obs, goal, noise, t_start=1.0, steps=50))
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)
    # while a truncated refinement keeps what the draft says
    near = [policy.plan(obs, goal, noise, t_start=0.2, steps=2) for _ in range(1)]
    monkeypatch.setattr(policy, "draft", lambda o, c: torch.full((2, H, 4), 0.0))
    assert (near[0] - policy.plan(obs, goal, noise, t_start=0.2, steps=2)).abs().max() > 0.1


def test_refinement_keeps_the_constraints_and_reference_variant_runs_unnoised():
    obs, goal = obs_goal()
    for noise_draft in (True, False):
        policy = maze_policy(noise_draft=noise_draft)
        plans = policy.plan(obs, goal, torch.randn(2, H, 4), steps=3)
        states = policy.plan_states(plans)
        torch.testing.assert_close(states[:, 0], obs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(states[:, -1, :2], goal, rtol=1e-5, atol=1e-5)
    # the reference variant ignores the noise
    a = policy.plan(obs, goal, torch.randn(2, H, 4), steps=3)
    torch.testing.assert_close(a, policy.plan(obs, goal, torch.randn(2, H, 4), steps=3))


def test_warm_plans_are_refined_instead_of_a_new_draft(monkeypatch):
    policy = maze_policy()
    obs, goal = obs_goal()
    monkeypatch.setattr(policy, "draft", lambda o, c: pytest.fail("a warm plan must not draft"))
    warm = torch.zeros(2, H, 4)
    assert policy.plan(obs, goal, torch.randn(2, H, 4), warm=warm, t_start=0.3, steps=1).shape == (2, H, 4)


@pytest.mark.parametrize("w", [0.0, 1.0, 1.5])
def test_guidance_weights_run_and_w1_is_the_conditional_model(w):
    policy = maze_policy(guidance_w=w)
    obs, goal = obs_goal()
    x, t = torch.randn(2, H, 4), torch.full((2,), 0.5)
    cond = policy.condition(obs, goal)
    out = policy.denoiser(cond)(x, t)
    assert out.shape == (2, H, 4) and torch.isfinite(out).all()
    if w == 1.5:  # guided = null + w (cond - null)
        policy.config.guidance_w = 1.0
        c = policy.denoiser(cond)(x, t)
        policy.config.guidance_w = 0.0
        u = policy.denoiser(cond)(x, t)
        torch.testing.assert_close(out, u + 1.5 * (c - u), rtol=1e-4, atol=1e-5)


def test_one_loss_trains_all_three_parts_and_logs_each():
    data = maze_dataset()
    policy = TrajectoryDiffuser.from_dataset(data, tiny())
    batch = {k: torch.as_tensor(v) for k, v in policy.batches(data, 8)(0, np.random.default_rng(0)).items()}
    loss, logs = policy.loss(batch)
    assert set(logs) == {"drafter", "refiner", "inverse"}
    loss.backward()
    for part in (policy.drafter, policy.net, policy.inverse):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_parts_can_be_trained_separately_from_a_checkpoint(tmp_path):
    data = maze_dataset()
    first = TrajectoryDiffuser.from_dataset(data, tiny(train_parts=("refiner",)))
    assert not any(p.requires_grad for p in first.drafter.parameters())
    first.save(tmp_path / "refiner")
    # a new drafter, of another stride, and inverse dynamics against the saved refiner
    second = TrajectoryDiffuser.from_dataset(data, tiny(train_parts=("drafter", "inverse"), draft_stride=4,
                                                        init_from=str(tmp_path / "refiner")))
    torch.testing.assert_close(second.net.state_dict(), first.net.state_dict())
    assert not any(p.requires_grad for p in second.net.parameters())
    batch = {k: torch.as_tensor(v) for k, v in second.batches(data, 4)(0, np.random.default_rng(0)).items()}
    assert set(second.loss(batch)[1]) == {"drafter", "inverse"}


def test_short_training_lowers_every_loss():
    from diffplan.train import TrainConfig, Trainer

    data = maze_dataset()
    torch.manual_seed(0)
    policy = TrajectoryDiffuser.from_dataset(data, tiny())
    sample = policy.batches(data, 16)
    fixed = {k: torch.as_tensor(v) for k, v in sample(0, np.random.default_rng(123)).items()}
    torch.manual_seed(0)
    before = policy.loss(fixed)[1]
    Trainer(policy, sample, TrainConfig(steps=150, batch_size=16, lr=3e-3, warmup_steps=5, ema_decay=0.0,
                                        progress=False, log_every=150)).fit()
    torch.manual_seed(0)
    after = policy.loss(fixed)[1]
    for part in ("drafter", "inverse", "refiner"):
        assert after[part] < before[part], part


def test_round_trip_through_load_policy_gives_the_same_plans_and_actions(tmp_path):
    policy = maze_policy(runtime=PlannerConfig(n_action_steps=4, seed=3))
    path = policy.save(tmp_path / "td")
    loaded = load_policy(path)
    assert type(loaded) is TrajectoryDiffuser and loaded.config == policy.config
    obs, goal = obs_goal()
    noise = torch.randn(2, H, 4)
    torch.testing.assert_close(loaded.plan(obs, goal, noise), policy.plan(obs, goal, noise))
    env_obs = {"observation": obs.numpy(), "desired_goal": goal.numpy(), "achieved_goal": obs[:, :2].numpy()}
    for p in (policy, loaded):
        p.reset(seed=0)
    for _ in range(6):
        np.testing.assert_allclose(loaded.act(env_obs), policy.act(env_obs), rtol=1e-5, atol=1e-6)


def test_reward_tasks_condition_on_return_to_go_and_act_by_inverse_dynamics():
    data = loco_dataset()
    cfg = tiny(normalizer="gaussian", action_mode="inverse", discount=0.9,
               runtime=PlannerConfig(n_action_steps=1, seed=0))
    policy = TrajectoryDiffuser.from_dataset(data, cfg).eval()
    batch = {k: torch.as_tensor(v) for k, v in policy.batches(data, 4)(0, np.random.default_rng(0)).items()}
    assert batch["rtg"].shape == (4, 1)
    assert set(policy.loss(batch)[1]) == {"drafter", "refiner", "inverse"}
    assert 0 < float(policy.default_return) <= 0.9 + 1e-6  # 0.9 of the max return, scaled
    obs = np.zeros(3, np.float32)
    a = policy.act(obs)
    assert a.shape == (2,) and np.all(np.abs(a) <= 1.0)
    policy.config.target_return = 2.0
    assert torch.allclose(policy.condition(torch.zeros(1, 3), None) * policy.return_scale, torch.tensor(2.0))


def test_goal_policies_refuse_plans_without_a_goal():
    policy = maze_policy()
    with pytest.raises(ValueError, match="goal"):
        policy.plan(torch.zeros(1, 4), None, torch.randn(1, H, 4))


def test_warm_replans_through_the_runtime_refine_the_shifted_plan_without_drafting(monkeypatch):
    policy = maze_policy(runtime=PlannerConfig(n_action_steps=2, warm_start=True, t_warm=0.3, warm_steps=1, seed=0))
    obs, goal = obs_goal(batch=1)
    env_obs = {"observation": obs.numpy(), "desired_goal": goal.numpy(), "achieved_goal": obs[:, :2].numpy()}
    policy.reset(seed=0)
    policy.act(env_obs)  # cold: drafts
    drafts = []
    real_draft = policy.draft
    monkeypatch.setattr(policy, "draft", lambda o, c: drafts.append(1) or real_draft(o, c))
    for _ in range(4):  # two warm replans
        assert np.all(np.abs(policy.act(env_obs)) <= 1.0)
    assert policy.planner.num_plans == 3 and not drafts


def test_the_shipped_umaze_checkpoint_loads_and_plans_from_its_start_to_its_goal():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "checkpoints" / "pointmaze-umaze" / "trajectory_diffuser"
    if not (path / "model.safetensors").is_file():
        pytest.skip("no shipped checkpoint")
    policy = load_policy(path, task="pointmaze-umaze")
    obs, goal = torch.tensor([[-1.0, -1.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    states = policy.plan_states(policy.plan(obs, goal, torch.randn(1, *policy.plan_shape)))
    torch.testing.assert_close(states[0, 0], obs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(states[0, -1, :2], goal[0], rtol=1e-4, atol=1e-4)
    assert (states[0, 1:, :2] - states[0, :-1, :2]).norm(dim=-1).max() < 0.5  # a continuous path


# ---------------------------------------------------------------- guidance distillation
def _cfg_gap(student, teacher, w, data):
    """On noised, inpainted training windows (t <= 0.6), as in the distillation loss: the mean
    squared gap between the student's conditional output and the teacher's CFG output, and the
    cosine between (student - teacher's conditional output) and (CFG output - the same)."""
    from diffplan.diffusion import noise_to
    from diffplan.policies.diffuser import window_constraints

    batch = {k: torch.as_tensor(v) for k, v in student.batches(data, 64)(0, np.random.default_rng(7)).items()}
    g = torch.Generator().manual_seed(7)
    x0 = student.normalizer.normalize(batch["x"])
    t = torch.rand(64, generator=g) * 0.6
    x = window_constraints(x0, 4, True).apply(noise_to(x0, t, student.schedule, generator=g))
    c = student._net_cond(student._train_condition(x0, batch))
    with torch.no_grad():
        cond = teacher(x, t, c)
        guided = torch.lerp(teacher(x, t, torch.zeros_like(c)), cond, w)
        out = student.net(x, t, c)
    gap = float((out - guided)[:, 1:-1].pow(2).mean())
    move, wanted = (out - cond)[:, 1:-1].flatten(), (guided - cond)[:, 1:-1].flatten()
    return gap, float(torch.nn.functional.cosine_similarity(move, wanted, dim=0))


def _teacher_checkpoint(tmp_path, data):
    """A tiny goal-CFG refiner, trained briefly so that its condition matters."""
    from diffplan.train import TrainConfig, Trainer

    torch.manual_seed(0)
    teacher = TrajectoryDiffuser.from_dataset(data, tiny(train_parts=("refiner",), cond_dropout=0.5))
    Trainer(teacher, teacher.batches(data, 16), TrainConfig(steps=60, batch_size=16, lr=3e-3, warmup_steps=5,
                                                            ema_decay=0.0, progress=False, log_every=60)).fit()
    return teacher.save(tmp_path / "teacher")


def test_guidance_distillation_drives_the_conditional_output_to_the_teachers_cfg_output(tmp_path):
    from diffplan.policies.training import train_policy

    data = maze_dataset()
    path = _teacher_checkpoint(tmp_path, data)
    cfg = {"kind": "trajectory_diffuser", "task": "synthetic",
           "policy": {**{k: v for k, v in vars(tiny()).items() if k != "runtime"}, "dim_mults": [1, 2],
                      "train_parts": ["refiner"], "distill_from": str(path), "distill_w": 8.0, "train_t_max": 0.6},
           "train": {"steps": 150, "batch_size": 16, "lr": 2e-3, "warmup_steps": 5, "ema_decay": 0.0,
                     "log_every": 150, "ckpt_every": 150}}
    torch.manual_seed(0)
    fresh = TrajectoryDiffuser.from_dataset(data, from_cfg(cfg))
    teacher = fresh.teacher
    # the student starts as the teacher; the teacher is frozen and not part of the checkpoint
    torch.testing.assert_close(fresh.net.state_dict(), teacher.state_dict())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("_teacher") for k in fresh.state_dict())
    before, _ = _cfg_gap(fresh, teacher, 8.0, data)
    assert before > 1e-3  # w=8 differs from the conditional model: there is something to learn
    student = train_policy(cfg, tmp_path / "run", progress=False, dataset=data)
    after, direction = _cfg_gap(student, teacher, 8.0, data)
    # the conditional output moved from the teacher's conditional output toward its CFG output
    assert after < 0.6 * before and direction > 0.6, (before, after, direction)
    # what was saved is the student alone, and it loads without the teacher
    loaded = load_policy(tmp_path / "run")
    assert loaded.teacher is None
    torch.testing.assert_close(loaded.net.state_dict(), student.net.state_dict())


def from_cfg(cfg):
    from diffplan.config import from_dict

    return from_dict(TrajectoryDiffuserConfig, cfg["policy"], "policy")


def test_distillation_refuses_a_teacher_that_does_not_fit(tmp_path):
    data = maze_dataset()
    path = TrajectoryDiffuser.from_dataset(data, tiny(dim=16)).save(tmp_path / "wide")
    with pytest.raises(ValueError, match="does not fit"):
        TrajectoryDiffuser.from_dataset(data, tiny(distill_from=str(path)))
    other = TrajectoryDiffuser.from_dataset(maze_dataset(seed=1), tiny()).save(tmp_path / "other")
    with pytest.raises(ValueError, match="other data"):
        TrajectoryDiffuser.from_dataset(data, tiny(distill_from=str(other)))
    with pytest.raises(ValueError, match="refiner"):
        tiny(distill_from=str(path), train_parts=("drafter",))
    with pytest.raises(ValueError, match="distill_w"):
        tiny(distill_w=-1.0)
    student = TrajectoryDiffuser(tiny(distill_from=str(path)), MAZE)  # built without from_dataset
    batch = {k: torch.as_tensor(v) for k, v in student.batches(data, 4)(0, np.random.default_rng(0)).items()}
    with pytest.raises(RuntimeError, match="no teacher"):
        student.loss(batch)


@pytest.mark.parametrize("steps,noise_draft", [(1, True), (3, True), (2, False)])
def test_plan_equals_the_generic_sampler_on_the_constrained_noised_draft(steps, noise_draft):
    from diffplan.diffusion import sample

    policy = maze_policy(noise_draft=noise_draft, guidance_w=1.5)
    obs, goal = obs_goal()
    noise = torch.randn(2, H, 4, generator=torch.Generator().manual_seed(1))
    cond = policy.condition(obs, goal)
    constraints = policy.constraints(obs, goal)
    x = constraints.apply(policy.draft(obs, cond))
    if noise_draft:
        t = torch.tensor(0.5)
        x = policy.schedule.alpha(t) * x + policy.schedule.sigma(t) * noise
    ref = sample(policy.denoiser(cond), x, schedule=policy.schedule, solver="ddim", steps=steps, t_start=0.5,
                 constraints=constraints, noise_prior=False)
    torch.testing.assert_close(policy.plan(obs, goal, noise, steps=steps), ref, rtol=1e-4, atol=1e-5)


def small_step_dataset(episodes=40, length=50, seed=0) -> OfflineDataset:
    """Random-walk states where one action moves the state little (s' = s + 0.05 M a), as in
    locomotion: the step is small next to the state's spread."""
    rng = np.random.default_rng(seed)
    m = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    obs, act = [], []
    for _ in range(episodes):
        a = rng.uniform(-1, 1, (length, 2))
        s = rng.normal(size=3) + np.concatenate([np.zeros((1, 3)), np.cumsum(0.05 * a[:-1] @ m.T, 0)])
        obs.append(s)
        act.append(a)
    n = episodes * length
    timeouts = np.zeros(n, bool)
    timeouts[length - 1::length] = True
    return OfflineDataset(observations=np.concatenate(obs), actions=np.concatenate(act), rewards=np.ones(n),
                          terminals=np.zeros(n, bool), timeouts=timeouts)


def test_inverse_dynamics_trained_on_refined_windows_reads_refined_plans_better():
    from diffplan.train import TrainConfig, Trainer

    data = small_step_dataset()
    # an untrained refiner distorts the plan a lot at t=0.1: the case the option is for
    kw = dict(train_parts=("inverse",), inverse_hidden=64, normalizer="gaussian", action_mode="inverse",
              refine_steps=1, t_start=0.1)
    trained = {}
    for source in ("data", "refined"):
        torch.manual_seed(0)  # the same (random, frozen) refiner in both
        policy = TrajectoryDiffuser.from_dataset(data, tiny(inverse_input=source, **kw))
        Trainer(policy, policy.batches(data, 32), TrainConfig(steps=300, batch_size=32, lr=3e-3, warmup_steps=5,
                                                              ema_decay=0.0, progress=False, log_every=300)).fit()
        trained[source] = policy.eval()
    torch.testing.assert_close(trained["data"].net.state_dict(), trained["refined"].net.state_dict())
    batch = {k: torch.as_tensor(v) for k, v in trained["data"].batches(data, 256)(0, np.random.default_rng(7)).items()}
    pol = trained["data"]
    x0 = pol.normalizer.normalize(batch["x"])
    cond = pol._train_condition(x0, batch)
    torch.manual_seed(1)
    refined = pol.refined_windows(x0, cond)
    assert (refined[:, 0] == x0[:, 0]).all()  # the start is imposed, the rest is refined
    assert (refined[:, 1] - x0[:, 1]).abs().mean() > 0.01
    a = pol.action_normalizer.normalize(batch["actions"][:, 0])
    err = {k: (p.inverse(refined[:, 0], refined[:, 1]) - a).pow(2).mean().item() for k, p in trained.items()}
    assert err["refined"] < 0.8 * err["data"], err


def test_inverse_training_refinement_can_differ_from_the_plans():
    """inverse_t_start / inverse_noise_draft set the refinement of the training windows alone;
    unset, they follow the plan's t_start / noise_draft."""
    data = small_step_dataset(episodes=4)
    kw = dict(train_parts=("inverse",), normalizer="gaussian", action_mode="inverse", inverse_input="refined",
              refine_steps=1, t_start=0.15, noise_draft=False)
    torch.manual_seed(0)
    follows = TrajectoryDiffuser.from_dataset(data, tiny(**kw)).eval()
    own = TrajectoryDiffuser(tiny(**kw, inverse_t_start=0.05, inverse_noise_draft=True), follows.spec)
    own.load_state_dict(follows.state_dict())
    batch = {k: torch.as_tensor(v) for k, v in follows.batches(data, 8)(0, np.random.default_rng(0)).items()}
    x0 = follows.normalizer.normalize(batch["x"])
    cond = follows._train_condition(x0, batch)
    cons = window_constraints(x0, follows.obs_dim, follows.goal_task)

    torch.manual_seed(1)
    a = follows.refined_windows(x0, cond)
    torch.manual_seed(2)  # un-noised: the noise draw does not matter
    torch.testing.assert_close(follows.refined_windows(x0, cond), a)
    torch.testing.assert_close(a, follows.refine(x0, cond, cons, torch.zeros_like(x0), t_start=0.15, steps=1,
                                                 noised=False))
    torch.manual_seed(3)
    b = own.refined_windows(x0, cond)
    torch.manual_seed(3)
    torch.testing.assert_close(b, own.refine(x0, cond, cons, torch.randn_like(x0), t_start=0.05, steps=1,
                                             noised=True))
    assert (b - a).abs().max() > 1e-3
    with pytest.raises(ValueError, match="inverse_t_start"):
        tiny(inverse_t_start=0.0)


def test_inverse_input_is_validated():
    with pytest.raises(ValueError, match="inverse_input must be"):
        tiny(inverse_input="plans")
    with pytest.raises(ValueError, match="frozen refiner"):
        tiny(inverse_input="refined")  # the default train_parts include the refiner
