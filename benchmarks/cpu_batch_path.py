"""The CPU batch path of the TemporalUNet: oneDNN convs (before) against the native conv path at
the batch sizes of ``diffplan.nn.unet.NATIVE_CONV_BATCHES`` (after), in one run.

    OMP_NUM_THREADS=1 python benchmarks/cpu_batch_path.py [--batches 1,2,3,4,8,64] [--rounds 3]

For each planner (the umaze Diffuser, a 3-level U-Net at H=128, and the pointmaze-medium Diffuser,
a 4-level U-Net at H=48) and batch size it times ``diffplan bench``'s replan latency (``plan p50``,
every call replans) with the native-path set emptied (today's oneDNN path everywhere) and as
shipped, interleaved over ``--rounds`` rounds (the best p50 of each), and appends the rows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_rows, stamp  # noqa: E402

from diffplan.nn import unet  # noqa: E402
from diffplan.policies import load_policy  # noqa: E402
from diffplan.runtime.bench import bench_policy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLANNERS = ["pointmaze-umaze/diffuser", "pointmaze-medium/diffuser"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,2,3,4,8,64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=40)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    shipped = unet.NATIVE_CONV_BATCHES
    rows = []
    for name in PLANNERS:
        policy = load_policy(ROOT / "checkpoints" / name, device="cpu")
        for batch in batches:
            best = {"before": float("inf"), "after": float("inf")}
            for _ in range(args.rounds):
                for label, native in (("before", frozenset()), ("after", shipped)):
                    unet.NATIVE_CONV_BATCHES = native
                    r = bench_policy(policy, batch=batch, calls=args.calls)
                    best[label] = min(best[label], r.plan_p50_ms)
            unet.NATIVE_CONV_BATCHES = shipped
            ratio = best["after"] / best["before"]
            print(f"{name:28s} batch {batch:3d}  replan before {best['before']:8.2f} ms  "
                  f"after {best['after']:8.2f} ms  after/before {ratio:.2f}  "
                  f"per env after {best['after'] / batch:.2f} ms", flush=True)
            rows.append([*stamp(), name, str(batch), f"{best['before']:.2f}", f"{best['after']:.2f}",
                         f"{ratio:.2f}", f"{best['after'] / batch:.2f}"])
    append_rows("CPU batch path of the TemporalUNet",
                "`benchmarks/cpu_batch_path.py`: replan latency (`diffplan bench` plan p50, best of the "
                "rounds) with oneDNN convs at every batch size (before) and with the native conv path at "
                f"batch sizes {sorted(shipped)} (after), interleaved in one run (issue #22).",
                ["date", "machine", "commit", "planner", "batch", "before ms", "after ms", "after/before",
                 "after ms/env"], rows)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
