"""Finetuning a pretrained diffusion planner: CTRL (label conditioning by RL with a KL anchor)."""
from diffplan.policies.finetune.ctrl import (
    AdaptedDenoiser,
    CTRLConfig,
    CTRLPlanner,
    LabelClassifier,
)

__all__ = ["AdaptedDenoiser", "CTRLConfig", "CTRLPlanner", "LabelClassifier"]
