"""Evaluation: rollouts on a task's protocol, D4RL-normalized scores, plots and videos."""
from diffplan.eval.evaluate import EvalReport, evaluate

__all__ = ["EvalReport", "evaluate"]
