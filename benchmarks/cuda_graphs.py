"""Issue #22 on a GPU: eager against CUDA-graph-captured plans, and training steps/s.

    python benchmarks/cuda_graphs.py [--replans 200] [--envs 4096] [--compile] [--plans-only]

Needs a CUDA device; on a machine without one it prints one line and exits 2 (nothing measured).
About 10 minutes on an H200 (most of it loading, capturing and the training part). Records:

1. Replan latency at batch 1, eager and captured (``PlannerConfig.cuda_graph``), median over
   ``--replans`` replans through ``policy.act`` (every plan forgotten first): the umaze Diffuser at
   DDIM-10 (target <= 1.5 ms captured), the hopper value-guided Diffuser (its shipped 20 DDIM steps,
   8 candidates; target <= 5 ms) and the umaze and hopper anchored policies (target >= 5,000
   replans/s). With ``--compile``, the two Diffusers once more with ``runtime.compile`` (their
   denoiser through ``torch.compile``), captured.
2. Anchored env decisions/s at ``--envs`` envs with its action queue (envs / mean ``act``
   latency), eager and captured (target >= 1,000,000).
3. TemporalUNet training steps/s and samples/s, eager (x0 loss, fused AdamW, EMA every step; the
   (1, 2, 2, 2) U-Net at H=32 x 14 features of the recorded 57 steps/s at batch 32), at batch
   32, 256 and 1024: the baseline a captured or compiled training step must beat 5x.
4. The same U-Net trained as a Diffuser through the library's ``Trainer`` (bf16 autocast, grad
   clipping, EMA, the LR schedule), on a synthetic 200k-step hopper-shaped dataset, four ways:
   host batches eager (the default), host batches captured (``train.cuda_graph``), device batches
   (``train.data_on_device``) eager, and device batches captured; steps/s from two runs of
   different lengths (their difference: no setup or capture time).

Observations are synthetic (small normal draws, goals for goal tasks): the GPU images lack MuJoCo,
and a plan's cost does not depend on the values.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_rows, stamp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLANNERS = [  # (checkpoint, solver steps or None for the shipped count, label)
    ("pointmaze-umaze/diffuser", 10, "umaze Diffuser DDIM-10"),
    ("hopper-medium/diffuser", None, "hopper value-guided Diffuser"),
    ("pointmaze-umaze/anchored", None, "umaze anchored"),
    ("hopper-medium/anchored", None, "hopper anchored"),
]


def observations(policy, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    spec = policy.spec
    obs = (0.1 * rng.normal(size=(batch, spec.obs_dim))).astype(np.float32)
    if not spec.goal_dim:
        return obs
    goal = rng.normal(size=(batch, spec.goal_dim)).astype(np.float32)
    return {"observation": obs, "achieved_goal": obs[:, : spec.goal_dim], "desired_goal": goal}


def replan_ms(policy, obs, n: int) -> list[float]:
    out = []
    for _ in range(n):
        policy.reset()
        t0 = time.perf_counter()
        policy.act(obs)  # the planner syncs the device before returning
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def act_ms(policy, obs, n: int) -> list[float]:
    policy.reset(seed=0)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        policy.act(obs)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def planning_rows(args, device: str) -> list[list[str]]:
    from diffplan.policies import load_policy

    rows = []
    for name, steps, label in PLANNERS:
        policy = load_policy(ROOT / "checkpoints" / name, device="cuda")
        cfg = policy.planner.config
        cfg.steps = steps
        cases = [("replan, batch 1", 1, replan_ms, args.replans)]
        if "anchored" in name:
            cases.append((f"act, {args.envs} envs", args.envs, act_ms, args.replans))
        for what, batch, fn, n in cases:
            obs = observations(policy, batch)
            res = {}
            for graph in (False, True):
                cfg.cuda_graph = graph
                policy.planner.graphs.clear()
                fn(policy, obs, 5)  # warm-up (and capture)
                stat = np.mean if fn is act_ms else np.median  # decisions/s: batch / mean act latency
                res[graph] = float(stat(fn(policy, obs, n)))
            cfg.cuda_graph = False
            eager, captured = res[False], res[True]
            rate = "decisions/s" if batch > 1 else "replans/s"
            print(f"{label:32s} {what:22s} eager {eager:8.3f} ms  captured {captured:8.3f} ms  "
                  f"speed-up {eager / captured:5.2f}x  {batch * 1e3 / captured:,.0f} {rate} captured "
                  f"(graphs: {len(policy.planner.graphs.graphs)}, eager fallbacks: "
                  f"{policy.planner.graphs.eager_calls})", flush=True)
            rows.append([*stamp(), device, label, what, f"{eager:.3f}", f"{captured:.3f}",
                         f"{eager / captured:.2f}x", f"{batch * 1e3 / captured:,.0f} {rate}"])
            if args.compile and batch == 1 and "Diffuser" in label:  # compiled denoiser (inference_net), captured
                rows += compiled_row(policy, label, what, obs, fn, n, res, device)
    return rows


def compiled_row(policy, label, what, obs, fn, n, res, device) -> list[list[str]]:
    """The plan again with ``runtime.compile`` (a torch.compile'd denoiser: fused kernels), captured;
    a failure is printed and gives no row."""
    cfg = policy.planner.config
    cfg.compile = cfg.cuda_graph = True
    policy.planner.graphs.clear()
    try:
        t0 = time.perf_counter()
        fn(policy, obs, 5)  # compiles, then captures
        warm = time.perf_counter() - t0
        compiled = float(np.median(fn(policy, obs, n)))
    except Exception as err:  # noqa: BLE001 - report it and go on with the other rows
        print(f"{label}: runtime.compile failed: {type(err).__name__}: {err}"[:800], flush=True)
        return []
    finally:
        cfg.compile = cfg.cuda_graph = False
        policy.planner.graphs.clear()
    print(f"{label:32s} {what:22s} compiled + captured {compiled:8.3f} ms ({res[True] / compiled:.2f}x "
          f"captured; compile and capture {warm:.0f} s)", flush=True)
    return [[*stamp(), device, f"{label}, runtime.compile", what, f"{res[False]:.3f}", f"{compiled:.3f}",
             f"{res[False] / compiled:.2f}x", f"{1e3 / compiled:,.0f} replans/s"]]


def training_rows(args, device: str) -> list[list[str]]:
    from diffplan.diffusion import Schedule, diffusion_loss
    from diffplan.nn import EMA, TemporalUNet

    torch.manual_seed(0)
    net = TemporalUNet(14, 32, (1, 2, 2, 2)).cuda()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4, fused=True)
    ema = EMA(net, decay=0.995)
    sched = Schedule.vp_cosine()
    rows = []
    for batch in (32, 256, 1024):
        x0 = torch.randn(batch, 32, 14, device="cuda")

        def step(x0=x0):
            loss = diffusion_loss(net, x0, sched, "x0")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update()

        for _ in range(10):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.train_steps):
            step()
        torch.cuda.synchronize()
        per_s = args.train_steps / (time.perf_counter() - t0)
        print(f"training, eager, batch {batch:5d}: {per_s:8.1f} steps/s  {per_s * batch:12,.0f} samples/s", flush=True)
        rows.append([*stamp(), device, "TemporalUNet (32, 1-2-2-2), H=32, D=14", f"eager, batch {batch}",
                     f"{per_s:.1f}", f"{per_s * batch:,.0f}"])
    return rows


def trainer_rows(args, device: str) -> list[list[str]]:
    from diffplan.data import OfflineDataset
    from diffplan.policies.diffuser import DiffuserConfig, DiffuserPlanner
    from diffplan.train import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    n, ep = 200_000, 1000
    timeouts = np.zeros(n, bool)
    timeouts[ep - 1::ep] = True
    data = OfflineDataset(observations=rng.normal(size=(n, 11)), actions=rng.uniform(-1, 1, (n, 3)),
                          rewards=rng.normal(size=n), terminals=np.zeros(n, bool), timeouts=timeouts,
                          env_id="Hopper-v5")
    pcfg = DiffuserConfig(horizon=32, with_actions=True, dim=32, dim_mults=(1, 2, 2, 2), normalizer="gaussian")
    torch.manual_seed(0)
    policy = DiffuserPlanner.from_dataset(data, pcfg)
    rows, base = [], {}
    for batch in (32, 256, 1024):
        for graph, on_device in ((False, False), (True, False), (False, True), (True, True)):
            batches = policy.batches(data, batch, device="cuda" if on_device else None)

            def seconds(steps):
                cfg = TrainConfig(steps=steps, batch_size=batch, warmup_steps=10, device="cuda", progress=False,
                                  log_every=steps, ckpt_every=steps, cuda_graph=graph, data_on_device=on_device)
                trainer = Trainer(policy, batches, cfg)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                trainer.fit()
                torch.cuda.synchronize()
                return time.perf_counter() - t0

            seconds(10)  # cuBLAS / cuDNN autotuning, allocator warm-up
            n_steps = args.train_steps * (4 if graph else 1)
            per_s = n_steps / (seconds(20 + n_steps) - seconds(20))
            way = f"{'captured' if graph else 'eager'}, {'device' if on_device else 'host'} batches"
            base.setdefault(batch, per_s)
            print(f"Trainer, Diffuser U-Net, batch {batch:5d}, {way:26s}: {per_s:8.1f} steps/s "
                  f"{per_s * batch:12,.0f} samples/s  ({per_s / base[batch]:.2f}x eager host)", flush=True)
            rows.append([*stamp(), device, f"batch {batch}", way, f"{per_s:.1f}", f"{per_s * batch:,.0f}",
                         f"{per_s / base[batch]:.2f}x"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replans", type=int, default=200)
    p.add_argument("--envs", type=int, default=4096)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--trainer-only", action="store_true", help="only the Trainer rows, recording nothing")
    p.add_argument("--compile", action="store_true", help="also plan at batch 1 with runtime.compile (torch.compile'd "
                   "denoiser), captured")
    p.add_argument("--plans-only", action="store_true", help="only the planning rows")
    args = p.parse_args(argv)
    if args.trainer_only:
        if not torch.cuda.is_available():
            return 2
        trainer_rows(args, torch.cuda.get_device_name())
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/cuda_graphs.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing measured",
              file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    plan = planning_rows(args, device)
    append_rows("cuda_graphs: eager against captured plans",
                "`python benchmarks/cuda_graphs.py` (issue #22): median latency through `policy.act`, "
                "eager and with `runtime.cuda_graph: true`; synthetic observations. Targets on an H200: "
                "umaze DDIM-10 <= 1.5 ms, hopper value-guided <= 5 ms, anchored >= 5,000 replans/s and "
                ">= 1,000,000 decisions/s at 4,096 envs.",
                ["date", "machine", "commit", "device", "policy", "measure", "eager ms", "captured ms",
                 "speed-up", "captured rate"], plan)
    if args.plans_only:
        return 0
    train = training_rows(args, device)
    append_rows("cuda_graphs: training steps/s",
                "`python benchmarks/cuda_graphs.py`: eager training steps (x0 loss, fused AdamW, EMA every "
                "step); the recorded H200 baseline is 57 steps/s at batch 32, the target 5x that.",
                ["date", "machine", "commit", "device", "network", "step", "steps/s", "samples/s"], train)
    trainer = trainer_rows(args, device)
    append_rows("cuda_graphs: Trainer steps/s",
                "`python benchmarks/cuda_graphs.py`: the (1, 2, 2, 2) dim-32 U-Net at H=32 x 14 trained as a "
                "Diffuser through `Trainer` (bf16 autocast, clipping, EMA, LR schedule) on synthetic "
                "hopper-shaped data: eager with host batches (the default) against `train.cuda_graph` and "
                "`train.data_on_device`; the ratio is to the eager host row of the same batch, same run.",
                ["date", "machine", "commit", "device", "batch", "step", "steps/s", "samples/s", "vs eager host"],
                trainer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
