"""The CPU batch path of the TemporalUNet: oneDNN convs (before) against the native conv path at
the batch sizes of ``diffplan.nn.unet.NATIVE_CONV_BATCHES`` for nets with ``dim * H <=
NATIVE_CONV_MAX_SIZE`` (after), in one run.

    OMP_NUM_THREADS=1 python benchmarks/cpu_batch_path.py [--batches 1,2,3,4,8,64] [--repeats 60]

For each planner (the umaze Diffuser, a 3-level U-Net at H=128, and the pointmaze-medium Diffuser,
a 4-level U-Net at H=48) and batch size it times replans through ``policy.act`` (as ``diffplan
bench``'s plan p50) with the native-path set emptied (oneDNN everywhere, the code before issue #22)
and as shipped, alternating call by call, and appends the medians.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_rows, stamp  # noqa: E402

from diffplan.nn import unet  # noqa: E402
from diffplan.policies import load_policy  # noqa: E402
from diffplan.runtime.bench import example_observations  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLANNERS = ["pointmaze-umaze/diffuser", "pointmaze-medium/diffuser"]


def replan_ms(policy, obs) -> tuple[float, float]:
    """One replan through ``policy.act`` (every env's plan forgotten first): wall and process CPU ms.
    With one thread the CPU time is the compute alone, whatever other jobs deschedule us."""
    policy.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    policy.act(obs)
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,2,3,4,8,64")
    p.add_argument("--repeats", type=int, default=60, help="interleaved pairs per batch size (a quarter at 64)")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    shipped = unet.NATIVE_CONV_BATCHES
    rows = []
    for name in PLANNERS:
        policy = load_policy(ROOT / "checkpoints" / name, device="cpu")
        for batch in batches:
            obs = example_observations(policy, batch)
            times = {"before": [], "after": []}
            for i in range(3 + max(8, args.repeats // (4 if batch >= 32 else 1))):
                for label, native in (("before", frozenset()), ("after", shipped)):
                    unet.NATIVE_CONV_BATCHES = native
                    ms = replan_ms(policy, obs)
                    if i >= 3:  # warm-up
                        times[label].append(ms)
            unet.NATIVE_CONV_BATCHES = shipped
            (before, before_cpu), (after, after_cpu) = (np.median(times[k], axis=0) for k in ("before", "after"))
            ratio, ratio_cpu = after / before, after_cpu / before_cpu
            print(f"{name:26s} batch {batch:3d}  replan before {before:7.2f} ({before_cpu:7.2f}) ms  after "
                  f"{after:7.2f} ({after_cpu:7.2f}) ms  after/before {ratio:.2f} ({ratio_cpu:.2f})  "
                  f"per env after {after / batch:.2f} ({after_cpu / batch:.2f}) ms", flush=True)
            rows.append([*stamp(), name, str(batch), f"{before:.2f} ({before_cpu:.2f})",
                         f"{after:.2f} ({after_cpu:.2f})", f"{ratio:.2f} ({ratio_cpu:.2f})",
                         f"{after / batch:.2f} ({after_cpu / batch:.2f})"])
    append_rows("CPU batch path of the TemporalUNet",
                "`benchmarks/cpu_batch_path.py`: median replan latency through `policy.act` (every env's "
                "plan forgotten first, as `diffplan bench`'s plan p50) with oneDNN convs at every batch "
                f"size (before) and with the native conv path at batch sizes {sorted(shipped)} for U-Nets with "
                f"dim * H <= {unet.NATIVE_CONV_MAX_SIZE} (after; the medium Diffuser's 32 x 48, not the "
                "umaze Diffuser's 32 x 128), "
                "before/after interleaved call by call in one run (issue #22); wall ms with the process CPU "
                "ms in brackets (one thread: the compute alone, insensitive to other jobs on the shared "
                "machine). Batch sizes outside the set run the same code both ways: their ratio shows "
                "the noise of the measurement.",
                ["date", "machine", "commit", "planner", "batch", "before ms", "after ms", "after/before",
                 "after ms/env"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
