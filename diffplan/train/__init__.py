"""Generic training: `Trainer` trains any module with a ``loss(batch)``; checkpoint folders; DDP."""

from diffplan.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    recover_checkpoints,
    save_checkpoint,
)
from diffplan.train.trainer import EagerStepCapture, TrainConfig, Trainer, learning_rate

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "EagerStepCapture",
    "TrainConfig",
    "Trainer",
    "latest_checkpoint",
    "learning_rate",
    "load_checkpoint",
    "recover_checkpoints",
    "save_checkpoint",
]
