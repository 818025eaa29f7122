"""Issue #23: what one env step of behavior training costs here, SAC against TQC.

    python benchmarks/behavior_step_cost.py [--env HalfCheetah-v5] [--steps 600] [--threads 1 2]

Each algorithm (rl-zoo's hyperparameters, ``diffplan.envs.behavior.SAC_HPARAMS``) first fills its
buffer with 1,000 random steps, then trains ``--steps`` env steps with one gradient step each, as the
expert runs do. Printed and recorded: env steps per second, and the ratio to SAC on one thread in the
same run (the baseline). Run it with nothing else busy: the two cores here share more than their
names suggest, and a second busy job halves the rate.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_rows, stamp  # noqa: E402


def env_steps_per_s(algo: str, env_id: str, steps: int, threads: int) -> float:
    import gymnasium as gym
    from sb3_contrib import TQC
    from stable_baselines3 import SAC

    from diffplan.envs.behavior import SAC_HPARAMS

    torch.set_num_threads(threads)
    cls = {"sac": SAC, "tqc": TQC}[algo]
    model = cls("MlpPolicy", gym.make(env_id), seed=0, device="cpu", **dict(SAC_HPARAMS, learning_starts=1000))
    model.learn(1000)  # random actions into the buffer, no updates yet
    t = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    return steps / (time.perf_counter() - t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="HalfCheetah-v5")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    rates = {(algo, th): env_steps_per_s(algo, a.env, a.steps, th) for th in a.threads for algo in ("sac", "tqc")}
    base = rates.get(("sac", 1)) or rates[("sac", a.threads[0])]
    rows = [[*stamp(), a.env, algo, str(th), f"{r:.1f}", f"{r / base:.2f}"] for (algo, th), r in rates.items()]
    for r in rows:
        print(" | ".join(r[3:]))
    if not a.no_record:
        append_rows("behavior step cost", __doc__.split("\n\n")[1].replace("\n", " "),
                    ["date", "machine", "commit", "env", "algo", "torch threads", "env steps/s",
                     "ratio to SAC on one thread"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
