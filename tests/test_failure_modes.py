"""Clear errors instead of silent garbage: NaN actions, corrupt normalizers and tensors, config
types, unknown checkpoint keys, and observations of the wrong dtype."""
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pytest
import torch
import yaml

from diffplan.config import ConfigError, from_dict
from diffplan.data import OfflineDataset
from diffplan.policies import DiffuserConfig, DiffuserPlanner, ObservationError, load_policy
from diffplan.policies.base import ActionError
from diffplan.train import CheckpointError, TrainConfig

TINY = DiffuserConfig(horizon=8, dim=8, dim_mults=(1, 2), normalizer="gaussian", pad=False, steps=2)


@pytest.fixture(scope="module")
def policy():
    rng = np.random.default_rng(0)
    n = 100
    data = OfflineDataset(rng.normal(size=(n, 4)), rng.uniform(-1, 1, (n, 2)), rng.normal(size=n),
                          np.zeros(n, bool), np.arange(n) % 50 == 49)
    torch.manual_seed(0)
    return DiffuserPlanner.from_dataset(data, TINY).eval()


def _copy(policy):
    twin = DiffuserPlanner(policy.config, policy.spec)
    twin.load_state_dict(policy.state_dict())
    return twin.eval()


def test_nan_weights_make_act_raise_naming_the_tensor(policy):
    broken = _copy(policy)
    name, weight = next(iter(broken.net.named_parameters()))
    with torch.no_grad():
        weight.fill_(float("nan"))
    with pytest.raises(ActionError, match=rf"NaN actions for env\(s\) \[0\]: net\.{name} holds NaN"):
        broken.act(np.zeros(4, np.float32))


def test_a_zero_std_normalizer_is_refused_at_load_and_at_act(policy, tmp_path):
    broken = _copy(policy)
    broken.normalizer.std[1] = 0.0
    with pytest.raises(ActionError, match=r"normalizer: GaussianNormalizer has a zero or negative scale in dimension\(s\) \[1\]"):
        broken.act(np.zeros(4, np.float32))
    broken.save(tmp_path / "zero-std")
    with pytest.raises(CheckpointError, match=r"model.safetensors: normalizer: .*zero or negative scale"):
        load_policy(tmp_path / "zero-std")


def test_fitted_normalizers_pass_their_own_check(policy):
    policy.normalizer.check()


def test_a_tensor_of_the_wrong_shape_names_the_tensor_and_both_shapes(policy, tmp_path):
    policy.save(tmp_path / "ckpt")
    cfg = yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())
    cfg["policy"]["dim"] = 16
    (tmp_path / "ckpt" / "config.yaml").write_text(yaml.safe_dump(cfg))
    # the first mismatch in the model's own order, deterministic
    with pytest.raises(CheckpointError, match=r"tensor 'net\.embed\.time_mlp\.0\.weight' has shape \(32, 8\), "
                                              r"but the model built from config.yaml expects \(64, 16\)"):
        load_policy(tmp_path / "ckpt")


def test_an_unknown_top_level_key_in_a_checkpoint_is_an_error_naming_it(policy, tmp_path):
    policy.save(tmp_path / "ckpt")
    cfg = yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())
    cfg["polcy"] = cfg["policy"]
    (tmp_path / "ckpt" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) 'polcy'"):
        load_policy(tmp_path / "ckpt")


@pytest.mark.parametrize("values, message", [
    ({"dim": "big"}, "policy.dim: expected a whole number, got 'big'"),
    ({"dim": 8.5}, "policy.dim: expected a whole number, got 8.5"),
    ({"dim_mults": [1, "x"]}, r"policy.dim_mults\[1\]: expected a whole number"),
    ({"dim_mults": 2}, "policy.dim_mults: expected"),
    ({"inpaint_goal": "yes"}, "policy.inpaint_goal: expected true or false, got 'yes'"),
    ({"solver": 3}, "policy.solver: expected a string, got 3"),
    ({"runtime": {"seed": "abc"}}, "policy.runtime.seed: expected"),
    ({"runtime": 5}, "policy.runtime: expected a mapping of PlannerConfig settings"),
    ({"runtime": {"n_action_steps": 0}}, "policy.runtime: n_action_steps must be >= 1"),
])
def test_config_values_are_checked_against_the_field_types(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(DiffuserConfig, values, "policy")


@dataclass
class _Typed:
    mode: Literal["fast", "exact"] = "fast"
    names: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    limit: int | None = 3


@pytest.mark.parametrize("values, message", [
    ({"mode": "slow"}, "typed.mode: expected one of 'fast', 'exact', got 'slow'"),
    ({"names": ["a", 1]}, r"typed.names\[1\]: expected a string, got 1"),
    ({"extra": [1]}, "typed.extra: expected dict"),
    ({"limit": "x"}, "typed.limit: expected int | None, got 'x'"),
])
def test_literal_list_dict_and_optional_fields_are_checked(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(_Typed, values, "typed")
    assert from_dict(_Typed, {"mode": "exact", "names": ["a"], "limit": None}, "typed") == \
        _Typed("exact", ["a"], {}, None)


def test_config_conversions_a_user_expects():
    cfg = from_dict(DiffuserConfig, {"kp": 2, "dim_mults": [1, 2], "runtime": {"seed": None}}, "policy")
    assert cfg.kp == 2.0 and isinstance(cfg.kp, float) and cfg.dim_mults == (1, 2) and cfg.runtime.seed is None
    train = from_dict(TrainConfig, yaml.safe_load("lr: 2e-4\nsteps: 1e3\nbetas: [0.9, 0.99]"), "train")
    assert train.lr == 2e-4 and train.steps == 1000 and train.betas == (0.9, 0.99)


@pytest.mark.parametrize("values, message", [
    ({"lr": "abc"}, "train.lr: expected a number, got 'abc'"),
    ({"lr": -1e-3}, "TrainConfig.lr must be > 0"),
    ({"steps": -5}, "TrainConfig.steps must be >= 1"),
    ({"batch_size": 0}, "TrainConfig.batch_size must be >= 1"),
    ({"betas": [0.9]}, "train.betas: expected 2 values"),
    ({"progress": 1}, "train.progress: expected true or false"),
])
def test_train_config_types_and_ranges(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, values, "train")


@pytest.mark.parametrize("obs, dtype", [
    (np.array([1 + 2j, 0, 0, 0]), "complex128"),
    (np.array([None, 1.0, 2.0, 3.0], dtype=object), "object"),
    (np.array(["1", "2", "3", "4"]), "<U1"),
])
def test_observations_of_the_wrong_dtype_name_the_dtype(policy, obs, dtype):
    with pytest.raises(ObservationError, match=rf"observation has dtype {dtype}; expected real numbers"):
        policy.act(obs)


def test_library_entry_points_refuse_empty_runs(policy):
    from diffplan.eval import evaluate
    from diffplan.runtime.bench import bench_policy

    with pytest.raises(ValueError, match="episodes >= 1"):
        evaluate(policy, "pointmaze-umaze", episodes=0)
    with pytest.raises(ValueError, match="batch >= 1"):
        bench_policy(policy, batch=0)
