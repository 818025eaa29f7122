"""The drafter's causal transformer: a real causal mask, and a KV cache that equals recomputation."""
import pytest
import torch

from diffplan.nn.causal_transformer import CausalTransformer, CausalTransformerConfig

torch.set_num_threads(1)


def model(cond_dim=3, **kw) -> CausalTransformer:
    torch.manual_seed(0)
    cfg = CausalTransformerConfig(in_dim=4, out_dim=5, cond_dim=cond_dim, max_len=12, width=32,
                                  depth=2, heads=4, **kw)
    return CausalTransformer(cfg).eval()


def test_changing_a_future_token_never_changes_an_earlier_prediction():
    net = model()
    x, cond = torch.randn(2, 10, 4), torch.randn(2, 3)
    base = net(x, cond)
    for j in range(10):
        x2 = x.clone()
        x2[:, j] += torch.randn(2, 4) * 5
        out = net(x2, cond)
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
        assert (out[:, j] - base[:, j]).abs().max() > 1e-4  # and the token itself does matter


def test_every_prediction_depends_on_the_conditioning_token():
    net = model()
    x = torch.randn(2, 6, 4)
    a, b = net(x, torch.zeros(2, 3)), net(x, torch.ones(2, 3))
    assert ((a - b).abs().amax(-1) > 1e-4).all()


@pytest.mark.parametrize("chunks", [[1] * 10, [3, 1, 4, 2], [10]])
def test_incremental_decoding_equals_full_recomputation(chunks):
    net = model()
    x, cond = torch.randn(2, 10, 4), torch.randn(2, 3)
    full = net(x, cond)
    cache = net.new_cache(2)
    outs, start = [], 0
    for n in chunks:
        outs.append(net(x[:, start: start + n], cond if start == 0 else None, cache=cache))
        start += n
    assert cache.length == 11  # prefix + 10 tokens
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_without_a_conditioning_token_the_sequence_starts_at_position_zero():
    net = model(cond_dim=0)
    x = torch.randn(1, 5, 4)
    cache = net.new_cache(1)
    steps = torch.cat([net(x[:, i: i + 1], cache=cache) for i in range(5)], 1)
    torch.testing.assert_close(steps, net(x), rtol=1e-5, atol=1e-5)


def test_bad_shapes_and_overlong_sequences_are_refused_with_a_clear_error():
    net = model()
    with pytest.raises(ValueError, match="tokens must have shape"):
        net(torch.randn(1, 3, 5), torch.randn(1, 3))
    with pytest.raises(ValueError, match="give cond exactly"):
        net(torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="max_len"):
        net(torch.randn(1, 12, 4), torch.randn(1, 3))
