"""The generic real-time planning loop every policy's ``act`` goes through."""
from diffplan.runtime.planner import Planner, PlannerConfig, shift_plans
from diffplan.runtime.episode import run_episode

__all__ = ["Planner", "PlannerConfig", "run_episode", "shift_plans"]
