"""Policies: every one implements reset / act / save and loads through ``load_policy``."""
from diffplan.policies.base import POLICIES, ObservationError, PolicyBase, SpaceSpec, load_policy, register_policy
from diffplan.policies.diffuser import DiffuserConfig, DiffuserPlanner

__all__ = ["POLICIES", "DiffuserConfig", "DiffuserPlanner", "ObservationError", "PolicyBase", "SpaceSpec",
           "load_policy", "register_policy"]
from diffplan.policies.anchored import AnchoredConfig, AnchoredDiffusionPolicy  # noqa: E402
from diffplan.policies.bc import BCConfig, BCPolicy  # noqa: E402

__all__ += ["AnchoredConfig", "AnchoredDiffusionPolicy", "BCConfig", "BCPolicy"]
from diffplan.policies.trajectory_diffuser import TrajectoryDiffuser, TrajectoryDiffuserConfig  # noqa: E402

__all__ += ["TrajectoryDiffuser", "TrajectoryDiffuserConfig"]
from diffplan.policies.diffusion_policy import DiffusionPolicy, DiffusionPolicyConfig  # noqa: E402

__all__ += ["DiffusionPolicy", "DiffusionPolicyConfig"]
from diffplan.policies.finetune.ctrl import CTRLConfig, CTRLPlanner  # noqa: E402

__all__ += ["CTRLConfig", "CTRLPlanner"]
from diffplan.policies.critic import Critic, CriticConfig, rerank  # noqa: E402

__all__ += ["Critic", "CriticConfig", "rerank"]
