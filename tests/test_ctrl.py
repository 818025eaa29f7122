"""CTRL (Zhao et al. 2024): the adapter starts as the pretrained model, the KL anchor, where the
gradients go, the classifier's calibration, a toy mixture it must learn to split, and the policy."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffplan.diffusion import (
    Constraints,
    Schedule,
    diffusion_loss,
    make_denoiser,
    sample,
)
from diffplan.nn import MLPDenoiser, TemporalUNet
from diffplan.policies.finetune.ctrl import (
    AdaptedDenoiser,
    CTRLConfig,
    CTRLPlanner,
    LabelClassifier,
    ctrl_loss,
    fit_classifier,
)

torch.set_num_threads(1)
SCHEDULE = Schedule.vp_cosine()


def _adapted_unet(n_labels=3):
    torch.manual_seed(0)
    net = TemporalUNet(4, dim=8, dim_mults=(1, 2))
    pretrained = copy.deepcopy(net)
    return pretrained, AdaptedDenoiser(net, horizon=8, dim=4, n_labels=n_labels, hidden=16, depth=1)


def test_adapted_model_is_bit_identical_to_the_pretrained_one_at_init():
    pretrained, adapted = _adapted_unet()
    x, t = torch.randn(5, 8, 4), torch.rand(5)
    cond = F.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3).float()
    with torch.no_grad():
        assert torch.equal(adapted(x, t, cond), pretrained(x, t))
        assert torch.equal(adapted(x, t, None), pretrained(x, t))


def _one_loss(adapted, n_labels=3):
    classifier = LabelClassifier(8, 4, n_labels, hidden=16).requires_grad_(False)
    x_T = torch.randn(6, 8, 4)
    start = Constraints([0], [0, 1], torch.zeros(6, 1, 2))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return ctrl_loss(adapted, classifier, SCHEDULE, "x0", x_T, y, n_labels, steps=4, alpha=0.1,
                     constraints=start, truncate=False)


def test_kl_is_zero_at_init_and_positive_after_one_step():
    _, adapted = _adapted_unet()
    opt = torch.optim.Adam(adapted.adapter_parameters(), lr=1e-2)
    loss, logs = _one_loss(adapted)
    assert logs["kl"].item() == 0.0
    loss.backward()
    opt.step()
    _, logs = _one_loss(adapted)
    assert logs["kl"].item() > 0.0


def test_gradients_flow_only_into_the_adapter():
    pretrained, adapted = _adapted_unet()
    loss, _ = _one_loss(adapted)
    loss.backward()
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == {"net.embed.weight"} | {f"side.{n}" for n, _ in adapted.side.named_parameters()}
    for name, p in adapted.named_parameters():
        if name not in trainable:
            assert p.grad is None, name
    assert adapted.net.embed.weight.grad.abs().sum() > 0
    assert adapted.side.out.weight.grad.abs().sum() > 0
    n_base = sum(p.numel() for p in pretrained.parameters())
    assert n_base == sum(p.numel() for n, p in adapted.named_parameters() if n not in trainable)


def test_temperature_calibration_lowers_the_held_out_nll():
    torch.manual_seed(0)
    x = torch.randn(200, 4, 5)  # few samples, many features, noisy labels: over-training makes it over-confident
    y = (x[:, 0, 0] > 0).long()
    y = torch.where(torch.rand(200) < 0.25, 1 - y, y)
    clf = LabelClassifier(4, 5, 2, hidden=64)
    report = fit_classifier(clf, x, y, steps=300, batch_size=64, lr=3e-3, holdout=0.5)
    assert report["val_nll_calibrated"] < report["val_nll_raw"] - 0.01
    assert report["temperature"] > 1.0  # over-confident logits get cooled


def _mixture(n, generator=None):
    comp = torch.randint(0, 2, (n,), generator=generator)
    centre = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])[comp]
    return (centre + 0.2 * torch.randn(n, 2, generator=generator))[:, None, :], comp


@pytest.mark.parametrize("no_grad_early", [False, True])
def test_ctrl_moves_a_two_mode_mixture_into_the_requested_mode(no_grad_early):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = MLPDenoiser(2, 1, hidden=64, depth=2, emb_dim=16)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):  # the pretrained, unconditional model
        x0, _ = _mixture(256, g)
        loss = diffusion_loss(net, x0, SCHEDULE, "x0")
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = _mixture(1000, g)
    clf = LabelClassifier(1, 2, 2, hidden=32)
    fit_classifier(clf, x, y, steps=100, batch_size=128, lr=3e-3)
    clf.requires_grad_(False)

    adapted = AdaptedDenoiser(net, horizon=1, dim=2, n_labels=2, hidden=32, depth=1, label_lr_scale=10.0)
    opt = torch.optim.Adam(adapted.adapter_parameters(), lr=2e-3)
    for _ in range(80):
        yb = torch.randint(0, 2, (64,), generator=g)
        loss, _ = ctrl_loss(adapted, clf, SCHEDULE, "x0", torch.randn(64, 1, 2, generator=g), yb, 2,
                               steps=6, alpha=0.1, truncate=True, generator=g, no_grad_early=no_grad_early)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapted.adapter_parameters(), 5.0)
        opt.step()

    @torch.no_grad()
    def draw(cond):
        d = make_denoiser(adapted, SCHEDULE, "x0", cond)
        return sample(d, torch.zeros(1000, 1, 2), SCHEDULE, solver="ddim", eta=1.0, steps=6, generator=g)

    right_uncond = (draw(None)[:, 0, 0] > 0).float().mean().item()
    assert 0.25 < right_uncond < 0.75  # the pretrained model splits the samples
    for label, sign in ((0, -1.0), (1, 1.0)):
        cond = F.one_hot(torch.full((1000,), label), 2).float()
        inside = (sign * draw(cond)[:, 0, 0] > 0).float().mean().item()
        assert inside >= 0.9, (label, inside)


# ---------------------------------------------------------------------------------------------
# The policy on a small maze dataset

TASK = "pointmaze-umaze"


@pytest.fixture(scope="module")
def ctrl_policy():
    from diffplan.envs import get_task

    from diffplan.policies import DiffuserConfig, DiffuserPlanner

    torch.manual_seed(0)
    data = get_task(TASK).make_dataset(progress=False, steps=3000, seed=3)
    base = DiffuserPlanner.from_dataset(data, DiffuserConfig(horizon=8, dim=8, dim_mults=(1, 2), inpaint_goal=False))
    cfg = CTRLConfig(steps=3, classifier_steps=20, classifier_windows=2000, side_hidden=16, side_depth=1)
    return CTRLPlanner.from_pretrained(base, data, cfg), base, data


def test_from_pretrained_is_reproducible_whatever_the_global_rng(ctrl_policy):
    _, base, data = ctrl_policy
    cfg = CTRLConfig(steps=3, classifier_steps=5, classifier_windows=500, side_hidden=16, side_depth=1)
    torch.manual_seed(1)
    a = CTRLPlanner.from_pretrained(base, data, cfg)
    torch.manual_seed(2)
    b = CTRLPlanner.from_pretrained(base, data, cfg)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def _obs(batch=2):
    from diffplan.envs import get_task

    env = get_task(TASK).make_env()
    obs = [env.reset(seed=i)[0] for i in range(batch)]
    return {k: np.stack([o[k] for o in obs]) for k in obs[0]}


def test_policy_labels_are_the_free_cells_and_targets_resolve(ctrl_policy):
    policy, _, _ = ctrl_policy
    assert policy.config.label_names == ("r1c1", "r1c2", "r1c3", "r2c3", "r3c1", "r3c2", "r3c3")
    goal = torch.tensor([[-1.0, 1.0], [1.0, -1.0]])  # centres of cells (1, 1) and (3, 3)
    assert policy.target_labels("goal", 2, goal).tolist() == [0, 6]
    assert policy.target_labels("r2c3", 2, None).tolist() == [3, 3]
    assert policy.target_labels(["r1c2", 4], 2, None).tolist() == [1, 4]
    with pytest.raises(ValueError, match="unknown target"):
        policy.target_labels("r0c0", 1, None)


def test_policy_acts_inpaints_the_start_and_round_trips_through_a_checkpoint(ctrl_policy, tmp_path):
    from diffplan.policies import load_policy

    policy, _, _ = ctrl_policy
    obs = _obs()
    policy.reset(seed=0)
    a = policy.act(obs, target="r1c1")
    assert a.shape == (2, 2) and np.isfinite(a).all()
    np.testing.assert_allclose(policy.plan_states(policy.planner._plans)[:, 0].numpy(), obs["observation"], atol=1e-5)
    policy.save(tmp_path / "ctrl")
    loaded = load_policy(tmp_path / "ctrl")
    assert isinstance(loaded, CTRLPlanner)
    for (k, v), (k2, v2) in zip(policy.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    actions = []
    for p in (policy, loaded):
        p.reset(seed=0)
        actions.append(p.act(obs, target="r1c1"))
    np.testing.assert_array_equal(*actions)


def test_policy_at_init_samples_what_the_pretrained_planner_samples(ctrl_policy):
    policy, base, _ = ctrl_policy
    obs = torch.as_tensor(_obs()["observation"])
    noise = torch.randn(2, 8, 4)
    torch.manual_seed(1)
    ours = policy.plan(obs, None, noise, labels=torch.tensor([0, 5]))
    torch.manual_seed(1)
    denoise = make_denoiser(base.net, base.schedule, "x0")
    theirs = sample(denoise, noise * base.schedule.sigma(torch.tensor(1.0)), base.schedule, solver="ddim", eta=1.0,
                    steps=3, constraints=base.constraints(obs, None), noise_prior=False)
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------------------------------------
# grad_steps (DRaFT-K): only the last k steps carry the gradient through the chain

class _Recorder(torch.nn.Module):
    """Wraps an AdaptedDenoiser; records (conditional?, grad enabled?, x) of every forward."""

    def __init__(self, net):
        super().__init__()
        self.inner, self.calls = net, []

    def forward(self, x, t, cond=None):
        self.calls.append((cond is not None, torch.is_grad_enabled(), x.detach().clone(), float(t[0])))
        return self.inner(x, t, cond)


def test_grad_steps_backprops_only_through_the_last_steps_and_samples_one_early_kl_step():
    _, adapted = _adapted_unet()
    with torch.no_grad():  # move off the init so the KL and the gradients are not trivially zero
        adapted.net.embed.weight.normal_(0, 0.3)
        adapted.side.out.weight.normal_(0, 0.3)
    rec = _Recorder(adapted)
    classifier = LabelClassifier(8, 4, 3, hidden=16).requires_grad_(False)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    start = Constraints([0], [0, 1], torch.zeros(6, 1, 2))
    x_T = torch.randn(6, 8, 4, requires_grad=True)
    loss, logs = ctrl_loss(rec, classifier, SCHEDULE, "x0", x_T, y, 3, steps=5, alpha=0.1, constraints=start,
                           grad_steps=1)
    loss.backward()
    assert x_T.grad is None  # nothing flows back through the early chain
    cond_calls = [c for c in rec.calls if c[0]]
    ref_calls = [c for c in rec.calls if not c[0]]
    assert len(cond_calls) == 5  # every step samples with the adapted model ...
    assert len(ref_calls) == 2  # ... the reference runs only for the KL step drawn and the last step
    assert [g for _, g, _, _ in ref_calls] == [False, True]
    graded = [i for i, (_, g, _, _) in enumerate(cond_calls) if g]
    assert len(graded) == 2 and graded[-1] == 4 and graded[0] < 4  # one early KL step + the last step
    assert logs["kl"].item() > 0
    for p in adapted.adapter_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_grad_steps_reward_gradient_is_the_gradient_through_the_last_step_alone():
    from diffplan.policies.finetune.ctrl import ddpm_coefficients

    _, adapted = _adapted_unet()
    with torch.no_grad():
        adapted.net.embed.weight.normal_(0, 0.3)
    rec = _Recorder(adapted)
    classifier = LabelClassifier(8, 4, 3, hidden=16).requires_grad_(False)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    start = Constraints([0], [0, 1], torch.zeros(6, 1, 2))
    loss, _ = ctrl_loss(rec, classifier, SCHEDULE, "x0", torch.randn(6, 8, 4), y, 3, steps=4, alpha=0.0,
                        constraints=start, grad_steps=1)
    grads = torch.autograd.grad(loss, adapted.adapter_parameters(), allow_unused=True)
    # the same loss rebuilt from the last step's recorded input alone
    _, x_last, t_last = [(c, x, t) for c, _, x, t in rec.calls if c][-1]
    _, k_x, k_d, c, _ = ddpm_coefficients(SCHEDULE, 4)
    assert c[-1] == 0  # the last step is deterministic
    d = make_denoiser(adapted, SCHEDULE, "x0", F.one_hot(y, 3).float())(x_last, torch.full((6,), t_last))
    mask, fill = start.dense(x_last)
    x0 = torch.where(mask, fill, k_x[-1] * x_last + k_d[-1] * d)
    expected = torch.autograd.grad(-classifier.log_prob(x0, y).mean(), adapted.adapter_parameters(),
                                   allow_unused=True)
    for g, e in zip(grads, expected):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_grad_steps_must_fit_in_the_chain():
    with pytest.raises(ValueError, match="grad_steps"):
        CTRLConfig(steps=5, grad_steps=6)
    _, adapted = _adapted_unet()
    with pytest.raises(ValueError, match="grad_steps"):
        ctrl_loss(adapted, LabelClassifier(8, 4, 3, hidden=16), SCHEDULE, "x0", torch.randn(2, 8, 4),
                  torch.tensor([0, 1]), 3, steps=3, alpha=0.1, grad_steps=4)


def test_random_truncation_with_no_grad_early_skips_the_reference_before_the_cut():
    _, adapted = _adapted_unet()
    classifier = LabelClassifier(8, 4, 3, hidden=16).requires_grad_(False)
    y = torch.tensor([0, 1, 2, 0])
    seen_cuts = set()
    for seed in range(6):
        for no_grad_early in (False, True):
            rec = _Recorder(adapted)
            g = torch.Generator().manual_seed(seed)
            ctrl_loss(rec, classifier, SCHEDULE, "x0", torch.randn(4, 8, 4), y, 3, steps=6, alpha=0.1,
                      truncate=True, generator=g, no_grad_early=no_grad_early)
            graded = [i for i, (c, grad, _, _) in enumerate(c for c in rec.calls if c[0]) if grad]
            n_ref = sum(not c[0] for c in rec.calls)
            if not no_grad_early:  # every step builds a graph for its KL term
                assert graded == list(range(6)) and n_ref == 6
                continue
            cut = 6 - sum(not c[0] and c[1] for c in rec.calls)  # the reference has grad from the cut on
            seen_cuts.add(cut)
            early = [i for i in graded if i < cut]
            assert graded == early + list(range(cut, 6))  # backprop from the cut on ...
            assert len(early) == (1 if cut > 0 else 0)  # ... plus one KL step drawn before it
            assert n_ref == (6 - cut) + len(early)
    assert len(seen_cuts) > 1


def test_finetune_steps_sets_the_chain_length_of_the_loss_but_not_of_the_plans(ctrl_policy):
    import dataclasses

    policy, _, _ = ctrl_policy
    p = copy.deepcopy(policy)
    p.config = dataclasses.replace(p.config, finetune_steps=2, grad_steps=1)
    p.net = _Recorder(p.net)
    obs = torch.as_tensor(_obs()["observation"])
    p.loss({"start": obs, "y": torch.tensor([0, 3])})
    assert sum(c[0] for c in p.net.calls) == 2  # the finetuning chain: 2 steps
    p.net.calls.clear()
    with torch.no_grad():
        p.plan(obs, None, torch.randn(2, 8, 4), labels=torch.tensor([0, 3]))
    assert sum(c[0] for c in p.net.calls) == 3  # plans: config.steps
    with pytest.raises(ValueError, match="finetune_steps"):
        CTRLConfig(finetune_steps=-1)
    with pytest.raises(ValueError, match="grad_steps"):
        CTRLConfig(steps=10, finetune_steps=3, grad_steps=4)


def test_target_label_sampling_asks_for_the_goal_cell_in_that_fraction_of_each_batch(ctrl_policy):
    import dataclasses

    policy, _, data = ctrl_policy
    n = 4000
    data_y = policy.batches(data, n)(0, np.random.default_rng(0))["y"]
    mixed = copy.copy(policy)
    mixed.config = dataclasses.replace(policy.config, label_sampling="target", target_fraction=0.25, target="goal")
    assert mixed.training_target() == 0  # r1c1: the umaze eval goal cell
    b = mixed.batches(data, n)(0, np.random.default_rng(0))
    y = b["y"]
    changed = y != data_y  # same windows and data labels; some of them now ask for the goal cell
    assert (y[changed] == 0).all()
    base_goal = (data_y == 0).mean()
    assert base_goal < 0.5
    # P(goal) = f + (1 - f) * P_data(goal), f = 0.25
    assert abs((y == 0).mean() - (0.25 + 0.75 * base_goal)) < 0.03
    mixed.config = dataclasses.replace(mixed.config, target="r2c3", target_fraction=1.0)
    assert (mixed.batches(data, 64)(0, np.random.default_rng(1))["y"] == 3).all()


def test_reward_temperature_softens_the_classifier_reward():
    _, adapted = _adapted_unet()
    classifier = LabelClassifier(8, 4, 3, hidden=16).requires_grad_(False)
    torch.nn.init.normal_(classifier.net[-1].weight, std=3.0)  # a confident classifier
    x_T, y = torch.randn(6, 8, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    log_p = {}
    for temperature in (1.0, 1e6):
        _, logs = ctrl_loss(adapted, classifier, SCHEDULE, "x0", x_T, y, 3, steps=3, alpha=0.0, truncate=False,
                            generator=torch.Generator().manual_seed(0), reward_temperature=temperature)
        log_p[temperature] = logs["log_p"].item()
    assert log_p[1e6] == pytest.approx(-np.log(3), abs=1e-4)  # an infinitely soft classifier: uniform
    assert abs(log_p[1.0] - log_p[1e6]) > 0.05
    with pytest.raises(ValueError, match="reward_temperature must be"):
        CTRLConfig(reward_temperature=0.0)


def test_label_sampling_options_are_validated():
    with pytest.raises(ValueError, match="label_sampling must be one of"):
        CTRLConfig(label_sampling="goal")
    with pytest.raises(ValueError, match="target_fraction must be in"):
        CTRLConfig(label_sampling="target", target_fraction=1.5)


def test_target_starts_reaching_draws_starts_from_windows_that_end_in_the_target(ctrl_policy):
    import dataclasses

    from diffplan.policies.finetune.ctrl import end_cell_labels

    policy, _, data = ctrl_policy
    n = 512
    mixed = copy.copy(policy)
    near = {}
    for starts in ("any", "reaching"):
        mixed.config = dataclasses.replace(policy.config, label_sampling="target", target_fraction=1.0,
                                           target_starts=starts)
        b = mixed.batches(data, n)(0, np.random.default_rng(0))
        assert (b["y"] == 0).all()  # r1c1, the umaze eval goal cell
        near[starts] = np.isin(end_cell_labels(TASK, b["start"][:, :2]), [0, 1]).mean()  # start in r1c1 or r1c2
    # windows of H = 8 steps that end in r1c1 start in it or next to it; data starts are anywhere
    assert near["reaching"] > 0.95
    assert near["any"] < 0.6
    with pytest.raises(ValueError, match="target_starts must be"):
        CTRLConfig(label_sampling="target", target_starts="near")


def test_rest_fraction_puts_that_fraction_of_the_target_rows_at_rest(ctrl_policy):
    import dataclasses

    policy, _, data = ctrl_policy
    n = 2000
    mixed = copy.copy(policy)
    mixed.config = dataclasses.replace(policy.config, label_sampling="target", target_fraction=0.5)
    moving = mixed.batches(data, n)(0, np.random.default_rng(0))
    mixed.config = dataclasses.replace(mixed.config, rest_fraction=0.5)
    b = mixed.batches(data, n)(0, np.random.default_rng(0))
    np.testing.assert_array_equal(b["y"], moving["y"])
    np.testing.assert_array_equal(b["start"][:, :2], moving["start"][:, :2])  # same positions
    ask = b["y"] == 0
    rest = (b["start"][:, 2:] == 0).all(1) & (moving["start"][:, 2:] != 0).any(1)
    assert not (rest & ~ask).any()  # only rows asking for the target are put at rest
    assert abs(rest.sum() / ask.sum() - 0.5) < 0.08


# ---------------------------------------------------------------------------------------------
# Return levels on a reward task

def _skill_dataset(episodes=60, length=40, seed=0):
    """Episodes of one behavior each: a skill s in [0, 1] per episode, visible in the velocity
    (observation 1) and the action, paid as reward; so episode return = length * s (plus noise)."""
    from diffplan.data import OfflineDataset

    rng = np.random.default_rng(seed)
    skill = np.repeat(rng.uniform(0, 1, episodes), length)
    n = episodes * length
    step = np.tile(np.arange(length), episodes)
    obs = np.stack([step * skill, skill + 0.05 * rng.normal(size=n), rng.normal(size=n)], 1)
    actions = (skill + 0.05 * rng.normal(size=n))[:, None]
    timeouts = step == length - 1
    return OfflineDataset(obs, actions, skill + 0.05 * rng.normal(size=n), np.zeros(n, bool), timeouts)


@pytest.fixture(scope="module")
def return_ctrl():
    from diffplan.policies import DiffuserConfig, DiffuserPlanner

    torch.manual_seed(0)
    data = _skill_dataset()
    base = DiffuserPlanner.from_dataset(data, DiffuserConfig(horizon=8, dim=8, dim_mults=(1, 2), with_actions=True,
                                                             normalizer="gaussian", action_mode="plan"))
    cfg = CTRLConfig(label_kind="return_bucket", return_kind="episode", n_buckets=4, target="top", steps=3,
                     classifier_steps=300, classifier_windows=2000, side_hidden=16, side_depth=1, alpha=0.05)
    return CTRLPlanner.from_pretrained(base, data, cfg), data


def test_return_buckets_are_quantiles_of_episode_returns_and_the_classifier_is_calibrated(return_ctrl):
    from diffplan.data import SequenceWindows

    policy, data = return_ctrl
    assert policy.config.label_names == ("b0", "b1", "b2", "top")
    np.testing.assert_allclose(policy.label_freq.numpy(), 0.25, atol=0.06)  # quantile edges split evenly
    windows = SequenceWindows(data, 8, keys=("observations", "actions"), pad=True, episode_return=True)
    b = windows.sample(4000, np.random.default_rng(1))  # fresh windows, not the ones it was fitted on
    y = torch.as_tensor(policy.labels_of(None, b["episode_return"]))
    x = policy.normalizer.normalize(torch.as_tensor(np.concatenate([b["observations"], b["actions"]], -1)))
    with torch.no_grad():
        p = policy.classifier.logits(x).softmax(-1)
    conf, pred = p.max(-1)
    assert (pred == y).float().mean() > 0.8
    # expected calibration error over 10 confidence bins: confidence matches accuracy
    bins = torch.clamp((conf * 10).long(), max=9)
    ece = sum(((bins == k).float().mean() * ((pred == y)[bins == k].float().mean() - conf[bins == k].mean()).abs())
              for k in range(10) if (bins == k).any())
    assert float(ece) < 0.08, float(ece)
    assert policy.classifier_report["val_nll_calibrated"] <= policy.classifier_report["val_nll_raw"] + 1e-6


def test_return_conditioned_finetuning_lowers_the_loss_and_raises_p_top(return_ctrl):
    from diffplan.train import TrainConfig, Trainer

    policy, data = return_ctrl
    policy = copy.deepcopy(policy)
    sampler = policy.batches(data, 64)
    probe = {k: torch.as_tensor(v) for k, v in sampler(0, np.random.default_rng(7)).items()}

    def probe_loss():
        torch.manual_seed(3)  # the same start noise and truncation point before and after
        with torch.no_grad():
            loss, logs = policy.loss(probe)
        return float(loss), float(logs["log_p"])

    before, log_p_before = probe_loss()
    Trainer(policy, sampler, TrainConfig(steps=60, batch_size=64, lr=3e-3, warmup_steps=2, grad_clip=5.0,
                                         ema_decay=0.0, progress=False, log_every=1000)).fit()
    after, log_p_after = probe_loss()
    assert after < before - 0.05, (before, after)
    assert log_p_after > log_p_before


def test_return_conditioned_plans_repeat_with_the_seed_and_do_not_depend_on_the_batch(return_ctrl):
    policy, data = return_ctrl
    policy = copy.deepcopy(policy).eval()
    policy.config.eta = 1.0
    obs = data.observations[[0, 45, 130]]
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        policy.reset(seed=7)
        runs.append(policy.act(obs))
    np.testing.assert_array_equal(*runs)
    for i in range(3):
        policy.reset(seed=[7 + i])
        np.testing.assert_allclose(policy.act(obs[i: i + 1])[0], runs[0][i], atol=1e-4)


def test_ctrl_starts_from_the_unguided_trajectory_model_of_a_value_guided_diffuser():
    from diffplan.policies import DiffuserConfig, DiffuserPlanner

    torch.manual_seed(0)
    data = _skill_dataset(episodes=10)
    guided = DiffuserPlanner.from_dataset(data, DiffuserConfig(horizon=8, dim=8, dim_mults=(1, 2), with_actions=True,
                                                               value_guided=True))
    with pytest.raises(ValueError, match="unguided"):
        CTRLPlanner.from_pretrained(guided, data, CTRLConfig(label_kind="return_bucket", classifier_steps=1))
    base = guided.unguided()
    assert base.value is None and not base.config.value_guided
    x, t = torch.randn(2, 8, 4), torch.rand(2)
    assert torch.equal(base.net(x, t), guided.net(x, t))
    for key, value in guided.normalizer.state_dict().items():
        assert torch.equal(base.normalizer.state_dict()[key], value)


def test_a_return_level_target_asks_for_the_bucket_that_holds_it(return_ctrl):
    policy, _ = return_ctrl
    edges = policy.bucket_edges.tolist()
    levels = [edges[0] - 1.0, (edges[0] + edges[1]) / 2, (edges[1] + edges[2]) / 2, edges[2] + 1.0]
    assert [int(policy.target_labels(v, 1, None)[0]) for v in levels] == [0, 1, 2, 3]
    assert policy.target_labels([levels[3], "b0"], 2, None).tolist() == [3, 0]
    with pytest.raises(ValueError, match="unknown target"):
        policy.target_labels("b9", 1, None)


def test_n_samples_keeps_the_candidate_the_classifier_rates_highest_and_stays_per_env(return_ctrl):
    from diffplan.diffusion import sample as diffusion_sample

    policy, data = return_ctrl
    policy = copy.deepcopy(policy).eval()
    policy.config.eta, policy.config.n_samples = 1.0, 4
    assert policy.noise_samples == 4
    obs = torch.as_tensor(data.observations[[0, 45, 130]], dtype=torch.float32)
    noise = torch.randn(3, 4, *policy.plan_shape, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    with torch.no_grad():
        best = policy.plan(obs, None, noise, generator=gens)
        # every candidate, as the policy draws them: env g's rows come from its own generator
        policy.config.n_samples = 1
        gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
        labels = policy.target_labels("top", 12, None)
        cond = torch.nn.functional.one_hot(labels, policy.n_labels).float()
        from diffplan.diffusion import make_denoiser

        every = diffusion_sample(make_denoiser(policy.net, policy.schedule, policy.config.base.objective, cond),
                                 noise.flatten(0, 1), schedule=policy.schedule, solver="ddim", eta=1.0,
                                 steps=policy.config.steps, constraints=policy.constraints(obs.repeat_interleave(4, 0)),
                                 noise_prior=False, generator=gens)
        score = policy.classifier.log_prob(every, labels).view(3, 4)
    assert score.std(1).min() > 0  # the candidates differ, so the pick matters
    expect = every.view(3, 4, *policy.plan_shape)[torch.arange(3), score.argmax(1)]
    torch.testing.assert_close(best, expect)
    # batched acting equals per-env acting with n candidates each
    policy.config.n_samples = 4
    policy.reset(seed=[7, 8, 9])
    batched = policy.act(obs.numpy())
    for i in range(3):
        policy.reset(seed=[7 + i])
        np.testing.assert_allclose(policy.act(obs[i: i + 1].numpy())[0], batched[i], atol=1e-4)
    with pytest.raises(ValueError, match="n_samples"):
        CTRLConfig(n_samples=0)


def test_rest_fraction_on_a_reward_task_starts_target_rows_at_episode_first_states(return_ctrl):
    import dataclasses

    policy, data = return_ctrl
    policy = copy.deepcopy(policy)
    policy.config = dataclasses.replace(policy.config, label_sampling="target", target="top", target_fraction=0.5)
    moving = policy.batches(data, 2000)(0, np.random.default_rng(0))
    policy.config = dataclasses.replace(policy.config, rest_fraction=0.5)
    b = policy.batches(data, 2000)(0, np.random.default_rng(0))
    np.testing.assert_array_equal(b["y"], moving["y"])  # the same rows ask for the same labels
    moved = (b["start"] != moving["start"]).any(1)
    assert (b["y"][moved] == policy.n_labels - 1).all()  # only rows asking for the target move
    first = data.observations[data.episode_starts]
    at_first = (np.abs(b["start"][moved, None, :] - first[None]).max(-1) < 1e-6).any(1)
    assert at_first.all()  # ... to the first state of a data episode
    assert 0.4 < moved.sum() / 1000 < 0.55  # half of the ~1000 target rows (a few already started there)
