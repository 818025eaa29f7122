"""Schedules: boundary values, VP/flow identities, derivatives, the discrete DDPM view, diffusers tables."""
import math

import pytest
import torch

from diffplan.diffusion import Schedule


SCHEDULES = [Schedule.vp_cosine(), Schedule.vp_linear(), Schedule.scaled_linear(), Schedule.rectified_flow()]
IDS = [s.kind for s in SCHEDULES]


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_t0_is_data_and_noise_grows_monotonically(sched):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    a, s = sched.alpha(t), sched.sigma(t)
    assert a[0] == 1 and s[0] == 0
    assert (a[1:] <= a[:-1]).all() and (s[1:] >= s[:-1]).all()
    snr = sched.log_snr(t)
    assert torch.isfinite(snr).all() and (snr[1:] <= snr[:-1] + 1e-12).all()
    if sched.kind == "rectified_flow":
        torch.testing.assert_close(a + s, torch.ones_like(t))
        assert a[-1] == 0
    else:
        torch.testing.assert_close(a**2 + s**2, torch.ones_like(t))
        assert 0 < a[-1] < 0.07


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_follow_input_dtype_and_clamp_t(sched, dtype):
    t = torch.tensor([-0.5, 0.3, 1.5], dtype=dtype)
    a = sched.alpha(t)
    assert a.dtype == dtype and sched.sigma(t).dtype == dtype
    assert a[0] == 1 and a[2] == sched.alpha(torch.ones((), dtype=dtype))


@pytest.mark.parametrize("sched", SCHEDULES, ids=IDS)
def test_derivatives_match_finite_differences(sched):
    t = torch.tensor([0.1037, 0.4551, 0.7779], dtype=torch.float64)  # away from table knots
    h = 1e-7
    da, ds = sched.derivatives(t)
    torch.testing.assert_close(da, (sched.alpha(t + h) - sched.alpha(t - h)) / (2 * h), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds, (sched.sigma(t + h) - sched.sigma(t - h)) / (2 * h), rtol=1e-5, atol=1e-6)


def test_cosine_is_nichol_dhariwal_and_small_t_is_accurate_in_float32():
    s = 0.008
    t = torch.tensor([1e-4, 0.25, 0.5, 0.9], dtype=torch.float64)
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    torch.testing.assert_close(Schedule.vp_cosine().alpha(t) ** 2, f(t) / f(torch.zeros(1, dtype=torch.float64)))
    t32 = torch.tensor([0.0, 1e-5, 1e-3])
    torch.testing.assert_close(Schedule.vp_cosine().sigma(t32), Schedule.vp_cosine().sigma(t32.double()).float(),
                               rtol=1e-5, atol=0)


def test_vp_linear_is_the_continuous_limit_of_ddpm_linear_betas():
    betas = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
    table = torch.cumprod(1 - betas, 0)
    ours = Schedule.vp_linear().discrete(1000).alphas_cumprod
    assert (ours - table).abs().max() < 2e-3
    # log alpha^2 differs by the sum of beta^2 / 2 that the continuous form drops (~0.067 at the end)
    assert ((ours / table).log().abs() < 0.07).all()


def test_scaled_linear_and_cosine_tables_equal_diffusers():
    diffusers = pytest.importorskip("diffusers")
    d = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ac = Schedule.scaled_linear().discrete(1000).alphas_cumprod
    torch.testing.assert_close(ac, d.alphas_cumprod.double(), rtol=1e-13, atol=0)  # the same float32 table
    d = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    ac = Schedule.vp_cosine().discrete(1000).alphas_cumprod
    torch.testing.assert_close(ac[:-1], d.alphas_cumprod.double()[:-1], rtol=2e-5, atol=1e-7)  # last beta is clipped


def test_table_schedule_reads_entries_at_grid_points_and_interpolates_between():
    ac = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    sched = Schedule.from_alphas_cumprod(ac)
    k = torch.arange(3, dtype=torch.float64)
    torch.testing.assert_close(sched.alpha((k + 1) / 3.0) ** 2, ac)
    mid = sched.alpha(torch.tensor([0.5], dtype=torch.float64)) ** 2  # halfway between k=0 (t=1/3) and k=1 (t=2/3)
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(0.9 * 0.5)], dtype=torch.float64))
    assert sched.alpha(torch.zeros(1)) == 1


def test_discrete_view_maps_indices_and_samples_training_levels():
    disc = Schedule.vp_cosine().discrete(20)
    assert torch.allclose(disc.t([0, 19]), torch.tensor([0.05, 1.0]))
    assert disc.index(torch.tensor([0.05, 1.0, 0.0])).tolist() == [0, 19, -1]
    g = torch.Generator().manual_seed(0)
    t = disc.sample_t(5000, generator=g)
    assert set((t * 20).round().long().tolist()) == set(range(1, 21))
    t = Schedule.scaled_linear().discrete(1000).sample_t(1000, generator=g, high=50)
    assert t.min() >= 0.001 and t.max() <= 0.05
    grid = disc.grid([15, 10, 5, 0])
    torch.testing.assert_close(grid, torch.tensor([0.8, 0.55, 0.3, 0.05, 0.0], dtype=torch.float64))
    assert disc.leading_grid(4).tolist() == grid.tolist()


@pytest.mark.parametrize("sched", SCHEDULES + [Schedule.from_betas(torch.linspace(1e-4, 0.02, 50))],
                         ids=IDS + ["table"])
def test_config_round_trip(sched):
    back = Schedule.from_config(sched.to_config())
    t = torch.linspace(0, 1, 17, dtype=torch.float64)
    torch.testing.assert_close(back.alpha(t), sched.alpha(t))
    assert Schedule.from_config("vp_cosine").kind == "vp_cosine"
