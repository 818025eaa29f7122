"""Solvers against known answers: Gaussian data (closed-form denoiser and probability-flow map) and diffusers.

For data x0 ~ N(mu, s^2 I) and x_t = alpha x0 + sigma eps, the marginal at t is
N(alpha mu, (alpha^2 s^2 + sigma^2) I), the exact denoiser is
    E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu),
and the probability-flow ODE maps x_t to x_u by keeping the standardised value fixed (each
coordinate is a 1-D monotone transport between Gaussians, which is affine):
    x_u = alpha_u mu + std_u / std_t (x_t - alpha_t mu),   std^2 = alpha^2 s^2 + sigma^2.
"""
import math

import pytest
import torch

from diffplan.diffusion import (
    SOLVERS,
    Constraints,
    Schedule,
    ddim,
    dpmpp_2m,
    euler,
    heun,
    make_denoiser,
    sample,
    time_grid,
)


MU, SD = 0.5, 0.3


def gaussian_denoiser(sched):
    def denoise(x, t):
        a = sched.alpha(t).to(x.dtype)[:, None, None]
        s = sched.sigma(t).to(x.dtype)[:, None, None]
        return MU + a * SD**2 / (a**2 * SD**2 + s**2) * (x - a * MU)
    return denoise


def exact_flow_map(sched, x, t_from, t_to):
    t = torch.tensor([t_from, t_to], dtype=torch.float64)
    a, s = sched.alpha(t), sched.sigma(t)
    std = (a**2 * SD**2 + s**2).sqrt()
    return a[1] * MU + std[1] / std[0] * (x - a[0] * MU)


def x_start(n=256, seed=0):
    return torch.randn(n, 4, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- exactness ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sched", [Schedule.vp_cosine(), Schedule.vp_linear(), Schedule.rectified_flow()],
                         ids=["vp_cosine", "vp_linear", "rectified_flow"])
def test_ddim_and_dpmpp_at_many_steps_reproduce_the_exact_probability_flow_map(sched):
    x1 = x_start()
    exact = exact_flow_map(sched, x1, 1.0, 0.0)
    den = gaussian_denoiser(sched)
    err_ddim = (sample(den, x1, sched, "ddim", steps=1000, noise_prior=False) - exact).abs().max()
    err_dpm = (sample(den, x1, sched, "dpmpp_2m", steps=1000, noise_prior=False) - exact).abs().max()
    assert err_ddim < 1e-2 and err_dpm < 2e-3
    assert err_dpm < err_ddim / 3


@pytest.mark.parametrize("solver, order", [(ddim, 1), (euler, 1), (dpmpp_2m, 2), (heun, 2)])
@pytest.mark.parametrize("sched", [Schedule.vp_cosine(), Schedule.rectified_flow()], ids=["vp_cosine", "flow"])
def test_convergence_order_on_a_grid_that_avoids_the_singular_end(solver, order, sched):
    # t in [0.9, 0.1]: no alpha = 0 or sigma = 0 endpoint, so every method shows its textbook order
    x = exact_flow_map(sched, x_start(), 1.0, 0.9)
    exact = exact_flow_map(sched, x, 0.9, 0.1)
    errs = [(solver(gaussian_denoiser(sched), x, time_grid(n, 0.9, 0.1), sched) - exact).abs().max().item()
            for n in (64, 128, 256)]
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.25 for r in rates), (errs, rates)


def test_dpmpp_is_more_accurate_than_ddim_at_10_steps():
    for sched, factor in ((Schedule.vp_cosine(), 0.7), (Schedule.rectified_flow(), 0.5), (Schedule.vp_linear(), 1.0),
                          (Schedule.scaled_linear(), 1.0)):
        # with a uniform t grid, VP-linear's last step (t = 0.1 -> 0, the same first-order jump for both
        # solvers) dominates the error, hence only "better" there
        x1 = x_start()
        exact = exact_flow_map(sched, x1, 1.0, 0.0)
        den = gaussian_denoiser(sched)
        e_ddim = (sample(den, x1, sched, "ddim", steps=10, noise_prior=False) - exact).pow(2).mean()
        e_dpm = (sample(den, x1, sched, "dpmpp_2m", steps=10, noise_prior=False) - exact).pow(2).mean()
        assert e_dpm < factor * e_ddim, (sched.kind, e_dpm, e_ddim)


@pytest.mark.parametrize("sched, solver, eta, steps", [
    (Schedule.vp_cosine(), "ddpm", None, 200),
    (Schedule.vp_cosine(), "ddim", 0.0, 100),
    (Schedule.vp_cosine(), "ddim", 1.0, 200),
    (Schedule.vp_cosine(), "dpmpp_2m", None, 25),
    (Schedule.vp_cosine(), "heun", None, 25),
    (Schedule.rectified_flow(), "euler", None, 50),
    (Schedule.rectified_flow(), "heun", None, 10),
    (Schedule.rectified_flow(), "dpmpp_2m", None, 20),
], ids=lambda v: getattr(v, "kind", v))
def test_sampled_mean_and_std_match_the_data(sched, solver, eta, steps):
    x = sample(gaussian_denoiser(sched), torch.zeros(2000, 8, 2), sched, solver, steps=steps, eta=eta,
               generator=torch.Generator().manual_seed(0))
    assert abs(x.mean().item() - MU) < 0.01
    assert abs(x.std().item() / SD - 1) < 0.05


# --- agreement with diffusers ---------------------------------------------------------------------
def fake_model(x, k):
    """A deterministic 'network' of the sample and the integer diffusers timestep."""
    return 0.8 * torch.sin(1.3 * x + 0.002 * k) + 0.1 * math.cos(0.01 * k)


@pytest.mark.parametrize("prediction", ["sample", "epsilon"])
@pytest.mark.parametrize("name", ["ddim", "ddim_eta1", "dpmpp_2m", "ddpm"])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "squaredcos_cap_v2"])
def test_trajectories_match_diffusers(name, prediction, beta_schedule):
    diffusers = pytest.importorskip("diffusers")
    T, steps = 1000, 12
    common = {"num_train_timesteps": T, "beta_schedule": beta_schedule, "prediction_type": prediction}
    if beta_schedule == "scaled_linear":
        common.update(beta_start=0.00085, beta_end=0.012)
    if name.startswith("ddim"):
        sch = diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)
    elif name == "ddpm":
        sch = diffusers.DDPMScheduler(**common, clip_sample=False)
    else:
        sch = diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                                    lower_order_final=True)
    sch.set_timesteps(steps)
    eta = 1.0 if name == "ddim_eta1" else 0.0
    x = torch.randn(2, 8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    g = torch.Generator().manual_seed(5)
    theirs, y = [], x.clone()
    for k in sch.timesteps:
        kw = {"eta": eta, "generator": g} if name.startswith("ddim") else {"generator": g} if name == "ddpm" else {}
        y = sch.step(fake_model(y, int(k)), k, y, **kw).prev_sample
        theirs.append(y)

    # ours: the schedule is the same alphas_cumprod table; the grid is diffusers' timesteps, t = (k + 1) / T, then 0
    sched = Schedule.scaled_linear() if beta_schedule == "scaled_linear" else Schedule.from_alphas_cumprod(sch.alphas_cumprod)
    disc = sched.discrete(T)
    ts = disc.grid(sch.timesteps)
    net = lambda xx, t, cond=None: fake_model(xx, int(disc.index(t[0])))
    denoise = make_denoiser(net, sched, "x0" if prediction == "sample" else "eps")
    ours = []
    kwargs = {"generator": torch.Generator().manual_seed(5)} if name in ("ddpm", "ddim", "ddim_eta1") else {}
    if name == "ddim_eta1":
        kwargs["eta"] = 1.0
    solver = SOLVERS["ddim" if name.startswith("ddim") else name]
    solver(denoise, x.clone(), ts, sched, constrain=lambda z: ours.append(z) or z, **kwargs)

    assert len(ours) == len(theirs) == steps
    for a, b in zip(ours, theirs):  # diffusers computes in float32: compare relative to the scale
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())


# --- the sample() entry point ---------------------------------------------------------------------
def test_truncated_sampling_stays_near_the_prior_and_t_start_1_ignores_it():
    sched = Schedule.vp_cosine()
    den = gaussian_denoiser(sched)
    prior = MU + SD * torch.randn(64, 16, 2, generator=torch.Generator().manual_seed(2))
    dist = {}
    for t_start in (0.02, 0.1, 1.0):
        out = sample(den, prior, sched, "ddim", steps=5, t_start=t_start, generator=torch.Generator().manual_seed(0))
        dist[t_start] = (out - prior).pow(2).mean().item()
    assert dist[0.02] < 0.05 * dist[1.0] and dist[0.1] < 0.3 * dist[1.0]
    far = sample(den, prior, sched, "ddim", steps=5, t_start=1.0, generator=torch.Generator().manual_seed(0))
    for other in (torch.full_like(prior, 7.0), torch.full_like(prior, float("nan"))):
        assert torch.equal(far, sample(den, other, sched, "ddim", steps=5, t_start=1.0,
                                       generator=torch.Generator().manual_seed(0)))


def test_noise_prior_false_starts_from_x_init_as_given():
    sched = Schedule.rectified_flow()
    den = lambda x, t: torch.zeros_like(x)
    x = torch.randn(3, 4, 2)
    out = sample(den, x, sched, "euler", steps=1, t_start=0.5, noise_prior=False)
    torch.testing.assert_close(out, torch.zeros_like(x))  # D = 0, one Euler step from t=0.5 to 0
    out = sample(den, x, sched, "euler", steps=1, t_start=0.5, t_end=0.25, noise_prior=False)
    torch.testing.assert_close(out, 0.5 * x)  # x_t = t eps exactly: halving t halves x


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_constraints_hold_exactly_in_the_output(solver):
    sched = Schedule.rectified_flow() if solver in ("euler", "heun") else Schedule.vp_cosine()
    start, goal = torch.randn(5, 2), torch.randn(5, 2)
    mid = torch.full((5, 1, 1), 3.0)
    c = Constraints.start_goal(start, goal) + Constraints([4], [2], mid)
    x = sample(gaussian_denoiser(sched), torch.zeros(5, 9, 3), sched, solver, steps=6, constraints=c,
               generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 0, :2], start) and torch.equal(x[:, -1, :2], goal) and torch.equal(x[:, 4, 2], mid[:, 0, 0])


def test_steps_0_returns_x_init_with_constraints_applied():
    x = torch.randn(2, 5, 3)
    c = [Constraints([0], slice(None), torch.zeros(1, 1, 3))]
    out = sample(gaussian_denoiser(Schedule.vp_cosine()), x, Schedule.vp_cosine(), steps=0, constraints=c)
    assert torch.equal(out[:, 1:], x[:, 1:]) and (out[:, 0] == 0).all()


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_a_generator_makes_sampling_reproducible(solver):
    sched = Schedule.vp_cosine()
    run = lambda: sample(gaussian_denoiser(sched), torch.zeros(3, 4, 2), sched, solver, steps=4,
                         generator=torch.Generator().manual_seed(11))
    assert torch.equal(run(), run())


def test_argument_errors_are_clear():
    sched, den, x = Schedule.vp_cosine(), gaussian_denoiser(Schedule.vp_cosine()), torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="eta"):
        sample(den, x, sched, "dpmpp_2m", eta=1.0)
    with pytest.raises(ValueError, match="solver"):
        sample(den, x, sched, "rk4")
    with pytest.raises(ValueError, match="t_start"):
        sample(den, x, sched, t_start=0.0)
    with pytest.raises(ValueError, match=r"\(B, H, D\)"):
        sample(den, torch.zeros(4, 2), sched)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_sampling_never_reads_device_tensor_values(solver):
    # On the meta device every tensor is shape-only: any .item(), bool(tensor), tolist() or data-dependent
    # branch on the sample, the constraints or the noise levels would raise. The per-grid coefficients
    # are computed on the host from the grid itself.
    sched = Schedule.vp_cosine()
    net = lambda x, t, cond: 0.9 * x
    meta = torch.device("meta")
    c = Constraints.start_goal(torch.ones(2, 3, device=meta), torch.zeros(2, 3, device=meta))
    for objective in ("x0", "eps", "flow"):
        for t_start in (1.0, 0.7):
            out = sample(make_denoiser(net, sched, objective), torch.empty(2, 8, 3, device=meta), sched, solver,
                         steps=5, t_start=t_start, constraints=c)
            assert out.device == meta and out.shape == (2, 8, 3)


# --- constraints --------------------------------------------------------------------------------
def test_constraints_dense_apply_and_combination():
    x = torch.zeros(2, 6, 4)
    c = Constraints([0, -1], [1, 3], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # broadcast over the batch
    c = c + Constraints(-1, slice(3, 4), torch.full((2, 1, 1), 9.0))  # later parts win
    y = c.apply(x)
    assert y[:, 0, 1].eq(1).all() and y[:, 0, 3].eq(2).all() and y[:, 5, 1].eq(3).all() and y[:, 5, 3].eq(9).all()
    assert y.abs().sum() == 2 * (1 + 2 + 3 + 9) and x.abs().sum() == 0  # out of place
    assert torch.equal(sum([c]).apply(x), y)
    with pytest.raises(ValueError, match="broadcast"):
        Constraints([0], [0, 1], torch.zeros(3, 1, 2)).apply(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sampling_follows_the_sample_dtype_and_passes_exact_noise_levels(dtype):
    sched = Schedule.vp_cosine()
    seen = []

    def denoise(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    out = sample(denoise, torch.zeros(2, 4, 3, dtype=dtype), sched, "dpmpp_2m", steps=4)
    assert out.dtype == dtype
    assert all(t.dtype == torch.promote_types(dtype, torch.float32) for t in seen)
    assert [round(t[0].item(), 6) for t in seen] == [1.0, 0.75, 0.5, 0.25]
