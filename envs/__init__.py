"""Task cards, expert and behavior controllers, dataset recipes (installed as diffplan.envs)."""
