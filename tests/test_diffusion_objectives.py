"""Objectives: conversions to x0 invert the training targets; diffusion_loss semantics."""
import pytest
import torch

from diffplan.diffusion import (
    OBJECTIVES,
    Constraints,
    Schedule,
    diffusion_loss,
    make_denoiser,
    noise_to,
    target,
    to_x0,
)


SCHEDULES = [Schedule.vp_cosine(), Schedule.vp_linear(), Schedule.scaled_linear(), Schedule.rectified_flow()]


@pytest.mark.parametrize("sched", SCHEDULES, ids=[s.kind for s in SCHEDULES])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_to_x0_inverts_the_training_target(sched, objective):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 5, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 5, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.8, 0.97], dtype=torch.float64)
    x_t = noise_to(x0, t, sched, eps=eps)
    y = target(x0, eps, t, sched, objective)
    torch.testing.assert_close(to_x0(y, x_t, t, sched, objective), x0)


def test_known_targets():
    sched = Schedule.rectified_flow()
    x0, eps, t = torch.ones(1, 2, 2), torch.full((1, 2, 2), 2.0), torch.tensor([0.25])
    torch.testing.assert_close(target(x0, eps, t, sched, "flow"), eps - x0)  # rectified-flow velocity
    torch.testing.assert_close(noise_to(x0, 0.25, sched, eps=eps), 0.75 * x0 + 0.25 * eps)
    with pytest.raises(ValueError, match="objective"):
        to_x0(x0, x0, t, sched, "score")


def test_noise_to_has_the_forward_marginal_and_is_reproducible():
    sched = Schedule.vp_cosine()
    x0 = torch.full((20000, 1, 1), 2.0)
    xt = noise_to(x0, 0.5, sched, generator=torch.Generator().manual_seed(1))
    a, s = sched.alpha(torch.tensor(0.5)).item(), sched.sigma(torch.tensor(0.5)).item()
    assert abs(xt.mean().item() - 2 * a) < 0.02 and abs(xt.std().item() - s) < 0.02
    assert torch.equal(xt, noise_to(x0, 0.5, sched, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loss_is_zero_for_the_oracle_and_positive_otherwise(objective):
    sched = Schedule.vp_cosine()
    x0 = torch.randn(8, 4, 2)
    g = torch.Generator().manual_seed(3)
    t = torch.rand(8, generator=torch.Generator().manual_seed(4))
    # with t given, the loss's first draw from `generator` is eps: replay it for the oracle
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    oracle = lambda x, tt, c: target(x0, eps, tt, sched, objective)
    assert diffusion_loss(oracle, x0, sched, objective, t=t, generator=g).item() < 1e-10
    zero = lambda x, tt, c: torch.zeros_like(x)
    assert diffusion_loss(zero, x0, sched, objective, t=t).item() > 1e-3


def test_loss_passes_cond_and_t_and_applies_weight():
    sched = Schedule.vp_cosine()
    seen = {}

    def net(x, t, cond):
        seen.update(t=t, cond=cond)
        return torch.zeros_like(x)

    x0 = torch.ones(4, 3, 2)
    t = torch.full((4,), 0.3)
    cond = torch.randn(4, 5)
    weight = torch.zeros(3, 2)
    weight[0] = 10.0
    loss = diffusion_loss(net, x0, sched, "x0", cond=cond, t=t, weight=weight)
    assert seen["cond"] is cond and torch.equal(seen["t"], t)
    torch.testing.assert_close(loss, torch.tensor(10.0 * 2 / 6))  # only step 0 counts, weight 10


def test_loss_inpaints_x_t_and_ignores_the_constrained_entries():
    sched = Schedule.vp_cosine()
    x0 = torch.randn(4, 6, 3)
    seen = {}

    def net(x, t, cond):
        seen["x"] = x
        out = x0.clone()
        out[:, 0, :2] += 100.0  # a wrong prediction exactly where the constraint sits
        return out

    c = Constraints([0], slice(0, 2), x0[:, :1, :2])
    loss = diffusion_loss(net, x0, sched, "x0", constraints=c, t=torch.full((4,), 0.9))
    assert torch.equal(seen["x"][:, 0, :2], x0[:, 0, :2])
    assert loss.item() == 0.0


def test_make_denoiser_returns_x0_for_every_objective():
    sched = Schedule.vp_linear()
    x0 = torch.randn(3, 4, 2, dtype=torch.float64)
    eps = torch.randn(3, 4, 2, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    x_t = noise_to(x0, t, sched, eps=eps)
    for objective in OBJECTIVES:
        net = lambda x, tt, c, o=objective: target(x0, eps, tt, sched, o)
        torch.testing.assert_close(make_denoiser(net, sched, objective)(x_t, t), x0)
