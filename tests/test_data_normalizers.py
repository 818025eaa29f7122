"""Normalizers: numpy and torch round trips, [-1, 1] limits, zero-spread guards, state_dict."""

import numpy as np
import pytest
import torch

from diffplan.data import GaussianNormalizer, LimitsNormalizer, make_normalizer

X = np.random.default_rng(0).normal(3.0, 2.0, size=(500, 4)).astype(np.float32)


@pytest.mark.parametrize("cls", [GaussianNormalizer, LimitsNormalizer])
def test_round_trip_numpy_and_torch_keep_type(cls):
    norm = cls.from_data(X)
    z = norm.normalize(X)
    assert isinstance(z, np.ndarray) and z.dtype == np.float32
    np.testing.assert_allclose(norm.unnormalize(z), X, atol=1e-5)
    t = torch.from_numpy(X)
    zt = norm.normalize(t)
    assert isinstance(zt, torch.Tensor) and zt.dtype == torch.float32
    torch.testing.assert_close(norm.unnormalize(zt), t, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(zt.numpy(), z, atol=1e-5)


def test_limits_maps_to_minus_one_one():
    z = LimitsNormalizer.from_data(X).normalize(X)
    np.testing.assert_allclose(z.min(axis=0), -1.0, atol=1e-6)
    np.testing.assert_allclose(z.max(axis=0), 1.0, atol=1e-6)


def test_gaussian_standardizes():
    z = GaussianNormalizer.from_data(X).normalize(X)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=1e-4)


@pytest.mark.parametrize("kind", ["gaussian", "limits"])
def test_constant_dimension_does_not_divide_by_zero(kind):
    x = X.copy()
    x[:, 2] = 7.0
    norm = make_normalizer(kind, 4).fit(x)
    z = norm.normalize(x)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z[:, 2], 0.0, atol=1e-6)
    np.testing.assert_allclose(norm.unnormalize(z), x, atol=1e-5)


@pytest.mark.parametrize("kind", ["gaussian", "limits"])
def test_state_dict_round_trip_into_a_fresh_normalizer(kind):
    fitted = make_normalizer(kind, 4).fit(X)
    fresh = make_normalizer(kind, 4)
    fresh.load_state_dict(fitted.state_dict())
    np.testing.assert_array_equal(fresh.normalize(X), fitted.normalize(X))
    assert all(isinstance(v, torch.Tensor) for v in fitted.state_dict().values())


def test_bad_inputs_raise_clear_errors():
    norm = GaussianNormalizer.from_data(X)
    with pytest.raises(ValueError, match="last axis of size 4"):
        norm.normalize(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="unknown normalizer"):
        make_normalizer("minmax", 4)
    with pytest.raises(ValueError, match="non-finite"):
        GaussianNormalizer(4).fit(np.full((3, 4), np.nan))


def test_normalizers_move_with_their_module_like_any_buffer():
    import torch
    from torch import nn

    from diffplan.data import GaussianNormalizer, LimitsNormalizer

    for cls in (GaussianNormalizer, LimitsNormalizer):
        owner = nn.Sequential(cls(3).fit(np.random.default_rng(0).normal(size=(50, 3))))
        owner.to(torch.float64).to("cpu")
        x = torch.ones(2, 3, dtype=torch.float64)
        assert owner[0].normalize(x).dtype == torch.float64
