"""``run_episode``: the plain Gymnasium loop, for scripts."""
from __future__ import annotations

import numpy as np


def run_episode(policy, env, seed: int | None = None, max_steps: int | None = None,
                options: dict | None = None) -> dict:
    """Run one episode of ``policy`` in a (non-vector) Gymnasium ``env``.

    Returns ``{"return", "length", "success", "observations"}``; observations are the env's
    (the ``observation`` part for dict spaces), stacked.
    """
    obs, _ = env.reset(seed=seed, options=options)
    policy.reset()
    total, steps, success, trace = 0.0, 0, False, []
    while max_steps is None or steps < max_steps:
        trace.append(np.asarray(obs["observation"] if isinstance(obs, dict) else obs).copy())
        obs, reward, terminated, truncated, info = env.step(policy.act(obs))
        total += float(reward)
        steps += 1
        success |= bool(info.get("success", False))
        if terminated or truncated:
            break
    return {"return": total, "length": steps, "success": success, "observations": np.stack(trace)}
