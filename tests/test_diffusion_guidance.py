"""Guidance: classifier-free guidance weights, value-gradient guidance raises the value."""
import pytest
import torch

from diffplan.diffusion import (
    Constraints,
    Schedule,
    ValueGuidance,
    cfg_denoiser,
    sample,
)



def conditional_denoiser():
    calls = []

    def denoise_cond(x, t, cond):  # a toy conditional model: pulls x towards cond[:, 0]
        calls.append(x.shape[0])
        return 0.5 * x + cond[:, :1, None] * (1 - t)[:, None, None]

    return denoise_cond, calls


def test_cfg_weight_0_is_unconditional_and_1_is_conditional_in_one_batched_call():
    denoise_cond, calls = conditional_denoiser()
    x, t = torch.randn(3, 4, 2), torch.rand(3)
    cond, null = torch.randn(3, 5), torch.zeros(5)
    d_c, d_u = denoise_cond(x, t, cond), denoise_cond(x, t, null.expand(3, 5))
    calls.clear()
    torch.testing.assert_close(cfg_denoiser(denoise_cond, cond, null, 0.0)(x, t), d_u)
    torch.testing.assert_close(cfg_denoiser(denoise_cond, cond, null, 1.0)(x, t), d_c)
    torch.testing.assert_close(cfg_denoiser(denoise_cond, cond, null, 1.5)(x, t), d_u + 1.5 * (d_c - d_u))
    assert calls == [6, 6, 6]  # one forward over [cond; null] per call


def test_cfg_inside_sample_moves_samples_towards_the_condition():
    denoise_cond, _ = conditional_denoiser()
    sched = Schedule.vp_cosine()
    cond = torch.full((64, 1), 2.0)
    run = lambda w: sample(cfg_denoiser(denoise_cond, cond, torch.zeros(1), w), torch.zeros(64, 8, 2), sched,
                           "ddim", steps=10, generator=torch.Generator().manual_seed(0))
    assert run(0.0).mean() < run(1.0).mean() < run(2.0).mean()


def gaussian_denoiser(sched, mu=0.0, sd=1.0):
    def denoise(x, t):
        a = sched.alpha(t)[:, None, None]
        s = sched.sigma(t)[:, None, None]
        return mu + a * sd**2 / (a**2 * sd**2 + s**2) * (x - a * mu)
    return denoise


def value(x, t):  # higher when the trajectory sits near +1
    return -((x - 1.0) ** 2).sum(dim=(1, 2))


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpmpp_2m"])
def test_value_guidance_increases_the_value_of_samples(solver):
    sched = Schedule.vp_cosine()
    run = lambda g: sample(gaussian_denoiser(sched), torch.zeros(256, 8, 2), sched, solver, steps=10, guidance=g,
                           generator=torch.Generator().manual_seed(0))
    base = value(run(None), None).mean()
    guided = value(run(ValueGuidance(value, scale=0.05, n_guide_steps=2, t_stopgrad=0.1)), None).mean()
    assert guided > base + 0.1 * base.abs()


def test_guidance_stops_below_t_stopgrad_and_keeps_constraints():
    sched = Schedule.vp_cosine()
    seen = []

    def counted(x, t):
        seen.append(t[0].item())
        return value(x, t)

    c = Constraints([0], slice(None), torch.full((1, 1, 2), -3.0))
    with torch.inference_mode():  # guidance still gets its gradients
        x = sample(gaussian_denoiser(sched), torch.zeros(4, 8, 2), sched, "ddim", steps=10, constraints=c,
                   guidance=ValueGuidance(counted, scale=0.5, n_guide_steps=3, t_stopgrad=0.5))
    assert len(seen) == 3 * 6 and min(seen) == pytest.approx(0.5)  # t = 1.0, 0.9, ..., 0.5
    assert (x[:, 0] == -3.0).all()


def test_variance_scaled_guidance_step_is_the_reference_formula():
    """Diffuser's n_step_guided_p_sample: x + scale * model_var * grad V, with model_var the DDPM
    posterior variance beta_t (1 - abar_s) / (1 - abar_t) of the step t -> s."""
    sched = Schedule.vp_cosine()
    c = torch.tensor([0.5, -1.0])
    toy_value = lambda x, t: -((x - c) ** 2).sum(dim=(1, 2))
    seen = []

    def denoise(x, t):
        seen.append(x.clone())
        return torch.zeros_like(x)

    x = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
    t, s, scale = 0.6, 0.55, 0.7
    guidance = ValueGuidance(toy_value, scale=scale, n_guide_steps=1, t_stopgrad=0.0, variance_scaled=True)
    sample(denoise, x, sched, "ddim", ts=[t, s], guidance=guidance, noise_prior=False)
    abar_t, abar_s = (float(sched.alpha(torch.tensor(v, dtype=torch.float64))) ** 2 for v in (t, s))
    var = (1 - abar_t / abar_s) * (1 - abar_s) / (1 - abar_t)
    torch.testing.assert_close(seen[0], x + scale * var * (-2 * (x - c)))
    # without the factor the step is scale * grad V (the shipped behaviour)
    seen.clear()
    sample(denoise, x, sched, "ddim", ts=[t, s], noise_prior=False,
           guidance=ValueGuidance(toy_value, scale=scale, n_guide_steps=1, t_stopgrad=0.0))
    torch.testing.assert_close(seen[0], x + scale * (-2 * (x - c)))
