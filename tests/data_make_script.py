"""`diffplan` CLI on a tiny synthetic task, run in a subprocess by the crash and concurrency tests.

    python tests/data_make_script.py [--hang READY] [--sync DIR] data make tiny-synthetic ...

The task ``tiny-synthetic`` (pointmaze-umaze's card) builds 600 random steps without simulating.
--hang READY: the Minari writer stops after its first episode, creates READY and sleeps, to be
killed mid-write. --sync DIR: each process creates DIR/started-<pid> once imported and logs every
recipe run to DIR/builds; a recipe run waits until two processes have started, so two concurrent
``data make`` overlap for sure.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from diffplan.data import OfflineDataset
from diffplan.envs import get_task
from diffplan.envs import tasks as registry

SYNC: Path | None = None


def synthetic(card, steps, seed, progress):
    if SYNC is not None:
        with open(SYNC / "builds", "a") as f:
            f.write(f"{os.getpid()}\n")
        deadline = time.monotonic() + 30
        while len(list(SYNC.glob("started-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the other process reaches the lock meanwhile
    rng = np.random.default_rng(seed)
    states = rng.normal(size=(steps + 1, 4)).astype(np.float32)
    timeouts = np.arange(steps) % 50 == 49
    return OfflineDataset(observations=states[:-1], actions=rng.uniform(-1, 1, (steps, 2)),
                          rewards=rng.uniform(size=steps), terminals=np.zeros(steps, bool),
                          timeouts=timeouts, goals=rng.normal(size=(steps, 2)),
                          next_observations=states[1:], source="synthetic")


TINY = get_task("pointmaze-umaze").replace(name="tiny-synthetic", dataset_steps=600,
                                           build_dataset=synthetic)


def hang_after_first_episode(ready: Path):
    from diffplan.data import minari_io

    real = minari_io._episode_buffers

    def buffers(data):
        for i, buffer in enumerate(real(data)):
            if i == 1:
                ready.touch()
                time.sleep(60)
            yield buffer

    minari_io._episode_buffers = buffers


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--hang", type=Path)
    parser.add_argument("--sync", type=Path)
    args, argv = parser.parse_known_args()
    registry._REGISTRY[TINY.name] = TINY
    if args.hang:
        hang_after_first_episode(args.hang)
    from diffplan.cli import main

    if args.sync:
        SYNC = args.sync
        (SYNC / f"started-{os.getpid()}").touch()
    sys.exit(main(argv))
