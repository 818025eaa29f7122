"""Time a task's dataset recipe: collection, Minari write and read, into a temporary folder.

    OMP_NUM_THREADS=1 python benchmarks/data_make.py [--task pointmaze-umaze] [--steps N]

Prints steps/s and wall times, and appends a row to the ``## data_make`` table of
``benchmarks/RESULTS.md`` (created if missing).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_rows, stamp  # noqa: E402

HEADER = ["date", "machine", "commit", "task", "steps", "episodes", "collect s", "collect steps/s",
          "Minari write s", "Minari read s", "total s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="pointmaze-umaze")
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's size")
    parser.add_argument("--no-record", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="diffplan-bench-") as root:
        os.environ["MINARI_DATASETS_PATH"] = root  # never the user's cache
        from diffplan.envs import get_task

        from diffplan.data import from_minari

        card = get_task(args.task)
        steps = args.steps or card.dataset_steps
        start = time.perf_counter()
        data = card.make_dataset(progress=True, steps=steps)
        collect = time.perf_counter() - start

        start = time.perf_counter()
        data.to_minari(card.dataset_id, eval_env=card.eval_env_spec(), description=card.recipe,
                       progress=True)
        write = time.perf_counter() - start

        start = time.perf_counter()
        back = from_minari(card.dataset_id)
        read = time.perf_counter() - start
        assert len(back) == len(data) and back.num_episodes == data.num_episodes

    total = collect + write
    print(f"{card.name}: {len(data):,} steps, {data.num_episodes:,} episodes")
    print(f"collect  {collect:7.1f} s  ({len(data) / collect:,.0f} steps/s)")
    print(f"write    {write:7.1f} s  (Minari, {data.num_episodes / write:,.0f} episodes/s)")
    print(f"read     {read:7.1f} s  (Minari -> OfflineDataset)")
    print(f"total    {total:7.1f} s  (collect + write)")
    if not args.no_record:
        row = stamp() + [card.name, f"{len(data):,}", f"{data.num_episodes:,}", f"{collect:.1f}",
                         f"{len(data) / collect:,.0f}", f"{write:.1f}", f"{read:.1f}", f"{total:.1f}"]
        print(f"recorded in {append_rows('data_make', _DESCRIPTION, HEADER, [row])}")
    return 0


_DESCRIPTION = ("`python benchmarks/data_make.py`: the task's dataset recipe (collection with "
                "the waypoint expert), then the Minari write (`to_minari`) and "
                "read back (`from_minari`), in a temporary MINARI_DATASETS_PATH.")


if __name__ == "__main__":
    raise SystemExit(main())
