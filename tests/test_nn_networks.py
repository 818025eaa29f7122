"""Networks: the (x, t, cond) -> shape-of-x contract, clear errors, and that each can fit a small batch."""
import math

import pytest
import torch

from diffplan.diffusion import Schedule, diffusion_loss
from diffplan.nn import (
    MLPDenoiser,
    SinusoidalEmbedding,
    TemporalUNet,
    TemporalUNetConfig,
    TimeCondEmbedding,
    Transformer1d,
)



def make(kind, D, H, cond_dim=0, **kw):
    if kind == "unet":
        return TemporalUNet(D, dim=16, dim_mults=(1, 2, 2), cond_dim=cond_dim, **kw)
    if kind == "transformer":
        return Transformer1d(D, width=32, depth=2, heads=2, cond_dim=cond_dim, horizon_max=64)
    return MLPDenoiser(D, H, hidden=64, depth=2, cond_dim=cond_dim)


@pytest.mark.parametrize("kind", ["unet", "transformer", "mlp"])
@pytest.mark.parametrize("cond_dim", [0, 3])
def test_output_has_the_shape_of_x_with_and_without_condition(kind, cond_dim):
    net = make(kind, D=5, H=12, cond_dim=cond_dim)
    x, t = torch.randn(2, 12, 5), torch.rand(2)
    assert net(x, t).shape == x.shape
    if cond_dim:
        y = net(x, t, torch.randn(2, cond_dim))
        assert y.shape == x.shape and torch.isfinite(y).all()
    else:
        with pytest.raises(ValueError, match="cond_dim=0"):
            net(x, t, torch.randn(2, 3))


@pytest.mark.parametrize("kw", [{}, {"film": True}, {"attention": True}])
def test_unet_variants_and_odd_horizons(kw):
    net = TemporalUNet(3, dim=16, dim_mults=(1, 2, 4, 8), **kw)
    assert net(torch.randn(2, 24, 3), torch.rand(2)).shape == (2, 24, 3)
    with pytest.raises(ValueError, match=r"horizon 30 is not a multiple of 8"):
        net(torch.randn(2, 30, 3), torch.rand(2))
    odd = TemporalUNet(3, dim=16, dim_mults=(1,))  # one level: any horizon works, odd included
    assert odd(torch.randn(2, 7, 3), torch.rand(2)).shape == (2, 7, 3)


def test_unet_config_rebuilds_the_same_architecture_and_the_diffuser_size():
    net = TemporalUNet(14, dim=32, dim_mults=(1, 2, 2, 2))
    again = TemporalUNet(config=TemporalUNetConfig(**vars(net.config)))
    again.load_state_dict(net.state_dict())
    x, t = torch.randn(1, 32, 14), torch.rand(1)
    torch.testing.assert_close(again(x, t), net(x, t))
    assert all(p.is_contiguous() for p in net.parameters())  # plain state_dict / safetensors
    assert 0.6e6 < sum(p.numel() for p in net.parameters()) < 0.8e6


@pytest.mark.parametrize("kind", ["unet", "transformer", "mlp"])
def test_batch_elements_are_independent(kind):
    net = make(kind, D=4, H=8).eval()
    x, t = torch.randn(3, 8, 4), torch.rand(3)
    torch.testing.assert_close(net(x, t)[1:2], net(x[1:2], t[1:2]), rtol=1e-4, atol=1e-5)


def test_transformer_horizon_limit_and_zero_init_output():
    net = Transformer1d(4, width=32, depth=1, heads=4, horizon_max=16)
    assert net(torch.randn(1, 16, 4), torch.rand(1)).abs().max() == 0  # adaLN-Zero output layer
    with pytest.raises(ValueError, match="horizon_max"):
        net(torch.randn(1, 17, 4), torch.rand(1))


def test_sinusoidal_embedding_matches_the_formula():
    emb = SinusoidalEmbedding(8)
    t = torch.tensor([0.0, 0.25, 1.0])
    freqs = 1000 * torch.exp(-math.log(10000) * torch.arange(4) / 3)
    arg = t[:, None] * freqs
    torch.testing.assert_close(emb(t), torch.cat([arg.sin(), arg.cos()], -1), atol=2e-4, rtol=1e-4)
    assert TimeCondEmbedding(8, out_dim=6)(t).shape == (3, 6)


@pytest.mark.parametrize("kind, steps", [("unet", 150), ("transformer", 300), ("mlp", 100)])
def test_a_tiny_model_overfits_a_small_batch(kind, steps):
    # 8 trajectories, each identified by a one-hot condition: the x0 objective is learnable at every t
    torch.manual_seed(0)
    D, H = 3, 8
    net = make(kind, D=D, H=H, cond_dim=8)
    x0, cond = torch.randn(8, H, D), torch.eye(8)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = diffusion_loss(net, x0, Schedule.vp_cosine(), "x0", cond=cond, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < first / 10, (first, last)
