"""A policy's solver steps follow its config, also when the config is edited after loading."""
import numpy as np
import torch

from diffplan.policies.base import SpaceSpec
from diffplan.policies.diffuser import DiffuserConfig, DiffuserPlanner
from diffplan.policies.trajectory_diffuser import (
    TrajectoryDiffuser,
    TrajectoryDiffuserConfig,
)

SPEC = SpaceSpec(obs_dim=3, act_dim=2, action_low=(-1.0, -1.0), action_high=(1.0, 1.0))


def _steps_used(policy) -> int:
    policy.reset(seed=0)
    policy.act(np.zeros(3, np.float32))
    return policy.planner.last_steps


def test_diffuser_steps_follow_the_config():
    torch.manual_seed(0)
    policy = DiffuserPlanner(DiffuserConfig(horizon=8, dim=8, dim_mults=(1, 2), steps=4, with_actions=True,
                                            action_mode="plan"), SPEC).eval()
    assert _steps_used(policy) == 4
    policy.config.steps = 2
    assert policy.default_steps == 2 and _steps_used(policy) == 2


def test_trajectory_diffuser_refine_steps_follow_the_config():
    torch.manual_seed(0)
    policy = TrajectoryDiffuser(TrajectoryDiffuserConfig(horizon=8, dim=8, dim_mults=(1, 2), refine_steps=3,
                                                         draft_width=16, draft_depth=1, draft_heads=2,
                                                         inverse_hidden=16, action_mode="inverse",
                                                         normalizer="gaussian"), SPEC).eval()
    assert _steps_used(policy) == 3
    policy.config.refine_steps = 1
    assert policy.default_steps == 1 and _steps_used(policy) == 1
