"""Sampler overhead, U-Net latency and training throughput on CPU (or one CUDA device).

    python benchmarks/sampler_overhead.py                 # threads 1 and 2, appends to benchmarks/RESULTS.md
    python benchmarks/sampler_overhead.py --threads 1 --quick --no-write
    python benchmarks/sampler_overhead.py --device cuda   # the same tables on the GPU (eager, synchronized)

1. Sampler overhead at batch 1: ``time(sample(..., steps=N)) / (N * time(one denoiser forward))`` for a
   small MLP denoiser (8-step action chunk, 2-D actions) and a Diffuser-size U-Net (dim 32, mults
   (1, 2, 2, 2), H=32, 14 features), DDIM and DPM-Solver++(2M) at N = 2, 5, 10, 20, from pure noise,
   x0 objective, under ``torch.inference_mode``. Targets: <= 1.15 (U-Net), <= 1.5 (MLP).
2. U-Net forward latency at batch 1 and 64, ours against a re-creation of the widely used reference
   TemporalUnet (Janner et al.'s structure: channels-first Conv1d, per-block time MLPs); also the
   (1, 2, 4, 8) locomotion configuration.
3. Training steps/s at batch 32 (x0 loss, AdamW, EMA update every step): H=32 / 14 features and
   H=128 / 6 features with mults (1, 2, 2, 2), and H=128 with the maze mults (1, 4, 8); ours (with
   AdamW's default foreach and its fused CPU kernel) against the reference re-creation trained the
   reference way (per-parameter Python EMA loop).

Every number is a median over interleaved repeats. The machine is shared, so both wall-clock and
the process CPU time (``time.process_time``: insensitive to being descheduled; with 2 threads it
sums both threads' work) are reported; the ratios are computed within one clock.
"""
# ruff: noqa: B023  (the timing lambdas are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import results

from diffplan.diffusion import Schedule, diffusion_loss, make_denoiser, sample
from diffplan.nn import EMA, MLPDenoiser, TemporalUNet


# --- the reference TemporalUnet, re-created for comparison ------------------------------------------
class _SinPos(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        half = self.dim // 2
        emb = torch.exp(torch.arange(half, device=x.device) * -(math.log(10000) / (half - 1)))
        emb = x[:, None] * emb[None, :]
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class _Conv1dBlock(nn.Module):
    def __init__(self, i, o, k, groups=8):
        super().__init__()
        self.conv, self.norm = nn.Conv1d(i, o, k, padding=k // 2), nn.GroupNorm(groups, o)

    def forward(self, x):  # the reference rearranges to 4-D around GroupNorm
        return F.mish(self.norm(self.conv(x).unsqueeze(2)).squeeze(2))


class _ResBlock(nn.Module):
    def __init__(self, i, o, emb, k=5):
        super().__init__()
        self.blocks = nn.ModuleList([_Conv1dBlock(i, o, k), _Conv1dBlock(o, o, k)])
        self.time_mlp = nn.Sequential(nn.Mish(), nn.Linear(emb, o))
        self.residual = nn.Conv1d(i, o, 1) if i != o else nn.Identity()

    def forward(self, x, t):
        out = self.blocks[0](x) + self.time_mlp(t)[:, :, None]
        return self.blocks[1](out) + self.residual(x)


class ReferenceTemporalUnet(nn.Module):
    """Janner et al.'s TemporalUnet structure (diffuser/models/temporal.py), without einops."""

    def __init__(self, transition_dim, dim=32, dim_mults=(1, 2, 4, 8)):
        super().__init__()
        dims = [transition_dim, *[dim * m for m in dim_mults]]
        in_out = list(itertools.pairwise(dims))
        self.time_mlp = nn.Sequential(_SinPos(dim), nn.Linear(dim, 4 * dim), nn.Mish(), nn.Linear(4 * dim, dim))
        self.downs = nn.ModuleList(
            nn.ModuleList([_ResBlock(i, o, dim), _ResBlock(o, o, dim),
                           nn.Conv1d(o, o, 3, 2, 1) if n < len(in_out) - 1 else nn.Identity()])
            for n, (i, o) in enumerate(in_out))
        mid = dims[-1]
        self.mid1, self.mid2 = _ResBlock(mid, mid, dim), _ResBlock(mid, mid, dim)
        self.ups = nn.ModuleList(
            nn.ModuleList([_ResBlock(2 * o, i, dim), _ResBlock(i, i, dim), nn.ConvTranspose1d(i, i, 4, 2, 1)])
            for i, o in reversed(in_out[1:]))
        self.final = nn.Sequential(_Conv1dBlock(dim, dim, 5), nn.Conv1d(dim, transition_dim, 1))

    def forward(self, x, t, cond=None):
        x = x.transpose(1, 2)
        t = self.time_mlp(t * 1000)
        h = []
        for r1, r2, down in self.downs:
            x = r2(r1(x, t), t)
            h.append(x)
            x = down(x)
        x = self.mid2(self.mid1(x, t), t)
        for r1, r2, up in self.ups:
            x = up(r2(r1(torch.cat((x, h.pop()), dim=1), t), t))
        return self.final(x).transpose(1, 2)


class ReferenceEMA:
    """Diffuser's EMA: a Python loop over parameters."""

    def __init__(self, model, beta=0.995):
        import copy
        self.beta, self.model, self.ema = beta, model, copy.deepcopy(model)

    @torch.no_grad()
    def update(self):
        for cur, avg in zip(self.model.parameters(), self.ema.parameters()):
            avg.data = avg.data * self.beta + (1 - self.beta) * cur.data


# --- timing helpers -------------------------------------------------------------------------------
def _sync() -> None:
    if torch.get_default_device().type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int = 1) -> tuple[float, float]:
    """(wall, process-CPU) seconds per call of ``fn`` over ``reps`` calls; on CUDA the wall clock
    runs from a synchronized start to a synchronized end."""
    _sync()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - w0) / reps, (time.process_time() - c0) / reps


def med(samples, clock):
    return statistics.median(s[clock] for s in samples)


# --- 1. sampler overhead ----------------------------------------------------------------------------
def sampler_overhead(repeats: int, steps_list=(2, 5, 10, 20)) -> list[dict]:
    sched = Schedule.vp_cosine()
    nets = {
        "MLP (H=8, D=2, 256x3)": (MLPDenoiser(2, 8, hidden=256, depth=3).eval(), (1, 8, 2)),
        "U-Net (32, 1-2-2-2, H=32, D=14)": (TemporalUNet(14, 32, (1, 2, 2, 2)).eval(), (1, 32, 14)),
    }
    rows = []
    with torch.inference_mode():
        for name, (net, shape) in nets.items():
            x, t = torch.randn(shape), torch.rand(shape[0])
            denoise = make_denoiser(net, sched, "x0")
            inner = max(1, int(0.02 / max(1e-5, timed(lambda: net(x, t), 5)[0])))  # ~20 ms blocks
            for _ in range(3):
                net(x, t)
            fwd, runs = [], {(s, n): [] for s in ("ddim", "dpmpp_2m") for n in steps_list}
            for _ in range(repeats):
                fwd.append(timed(lambda: net(x, t), inner))
                for (solver, n), acc in runs.items():
                    acc.append(timed(lambda: sample(denoise, x, sched, solver, steps=n), max(1, inner // n)))
            for (solver, n), acc in runs.items():
                rows.append({"net": name, "solver": solver, "steps": n,
                             "fwd_ms": med(fwd, 0) * 1e3, "fwd_cpu_ms": med(fwd, 1) * 1e3, "sample_ms": med(acc, 0) * 1e3,
                             "ratio": med(acc, 0) / (n * med(fwd, 0)), "ratio_cpu": med(acc, 1) / (n * med(fwd, 1))})
    return rows


# --- 2. U-Net forward latency -------------------------------------------------------------------------
def unet_latency(repeats: int) -> list[dict]:
    rows = []
    with torch.inference_mode():
        for mults in ((1, 2, 2, 2), (1, 2, 4, 8)):
            nets = {"ours": TemporalUNet(14, 32, mults).eval(), "reference": ReferenceTemporalUnet(14, 32, mults).eval()}
            params = sum(p.numel() for p in nets["ours"].parameters())
            for batch in (1, 64):
                x, t = torch.randn(batch, 32, 14), torch.rand(batch)
                inner = 10 if batch == 1 else 1
                res = {k: [] for k in nets}
                for k, net in nets.items():
                    for _ in range(3):
                        net(x, t)
                for _ in range(repeats):
                    for k, net in nets.items():
                        res[k].append(timed(lambda: net(x, t), inner))
                rows.append({"mults": mults, "params_M": params / 1e6, "batch": batch,
                             "ours_ms": med(res["ours"], 0) * 1e3, "ref_ms": med(res["reference"], 0) * 1e3,
                             "ours_cpu_ms": med(res["ours"], 1) * 1e3, "ref_cpu_ms": med(res["reference"], 1) * 1e3})
    return rows


# --- 3. training throughput -------------------------------------------------------------------------
def training_throughput(repeats: int, steps_per_rep: int = 3) -> list[dict]:
    sched = Schedule.vp_cosine()
    rows = []
    for H, D, mults in ((32, 14, (1, 2, 2, 2)), (128, 6, (1, 2, 2, 2)), (128, 6, (1, 4, 8))):
        torch.manual_seed(0)
        x0 = torch.randn(32, H, D)
        runs = {}
        for name in ("ours", "ours_fused", "reference"):
            net = ReferenceTemporalUnet(D, 32, mults) if name == "reference" else TemporalUNet(D, 32, mults)
            opt = torch.optim.AdamW(net.parameters(), lr=2e-4, fused=name == "ours_fused")
            ema = ReferenceEMA(net) if name == "reference" else EMA(net, decay=0.995)
            runs[name] = (net, opt, ema)

        def step(name):
            net, opt, ema = runs[name]
            if name == "reference":  # the reference's loss: random t and noise, x0 regression
                t = torch.rand(32)
                a, s = sched.alpha(t)[:, None, None], sched.sigma(t)[:, None, None]
                loss = F.mse_loss(net(a * x0 + s * torch.randn_like(x0), t), x0)
            else:
                loss = diffusion_loss(net, x0, sched, "x0")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update()

        for name in runs:
            for _ in range(2):
                step(name)
        res = {name: [] for name in runs}
        for _ in range(repeats):
            for name in runs:
                res[name].append(timed(lambda: step(name), steps_per_rep))
        row = {"H": H, "D": D, "mults": mults}
        for name in runs:
            row[name] = 1 / med(res[name], 0)
            row[name + "_cpu"] = 1 / med(res[name], 1)
        rows.append(row)
    return rows


# --- report: three tables in benchmarks/RESULTS.md (benchmarks/results.py convention) ---------------
OVERHEAD = ("sampler_overhead: sampler overhead at batch 1",
            ("`python benchmarks/sampler_overhead.py`: `time(sample(N steps)) / (N * time(one forward))`, "
             "pure noise, x0 objective, `torch.inference_mode`, median over interleaved repeats; "
             "wall-clock, with the process CPU time in brackets (the machine is shared). "
             "Targets: <= 1.15 U-Net, <= 1.5 MLP."))
LATENCY = ("sampler_overhead: TemporalUNet forward latency",
           ("`python benchmarks/sampler_overhead.py`: 32 steps x 14 features, median ms, wall (process CPU); "
            "reference = re-creation of Janner et al.'s TemporalUnet structure (channels-first Conv1d)."))
TRAINING = ("sampler_overhead: TemporalUNet training steps/s",
            ("`python benchmarks/sampler_overhead.py`: batch 32, x0 loss, AdamW, EMA update every step, dim 32; "
             "median steps/s, wall (from process CPU); reference = the re-creation trained the reference way "
             "(per-parameter Python EMA loop, default AdamW)."))


def rows_for(threads: int, overhead, latency, training):
    dev = torch.get_default_device()
    where = str(threads) if dev.type == "cpu" else f"{torch.cuda.get_device_name(dev)}, {threads} thread"
    stamp = results.stamp() + [where]
    o_rows = []
    for net in dict.fromkeys(r["net"] for r in overhead):
        for solver in ("ddim", "dpmpp_2m"):
            rs = [r for r in overhead if r["net"] == net and r["solver"] == solver]
            o_rows.append(stamp + [net, f"{rs[0]['fwd_ms']:.3f} ({rs[0]['fwd_cpu_ms']:.3f})", solver]
                          + [f"{r['ratio']:.2f} ({r['ratio_cpu']:.2f})" for r in rs])
    l_rows = [stamp + [str(r["mults"]), f"{r['params_M']:.2f} M", str(r["batch"]),
                       f"{r['ours_ms']:.2f} ({r['ours_cpu_ms']:.2f})", f"{r['ref_ms']:.2f} ({r['ref_cpu_ms']:.2f})",
                       f"{r['ours_ms'] / r['ref_ms']:.2f} ({r['ours_cpu_ms'] / r['ref_cpu_ms']:.2f})"] for r in latency]
    t_rows = [stamp + [str(r["H"]), str(r["D"]), str(r["mults"]), f"{r['ours']:.1f} ({r['ours_cpu']:.1f})",
                       f"{r['ours_fused']:.1f} ({r['ours_fused_cpu']:.1f})",
                       f"{r['reference']:.1f} ({r['reference_cpu']:.1f})",
                       (f"{r['ours'] / r['reference']:.2f}x / {r['ours_fused'] / r['reference']:.2f}x "
                        f"({r['ours_cpu'] / r['reference_cpu']:.2f}x / {r['ours_fused_cpu'] / r['reference_cpu']:.2f}x)")]
              for r in training]
    return o_rows, l_rows, t_rows


HEADERS = (
    ["date", "machine", "commit", "threads", "denoiser", "forward ms", "solver", "N=2", "N=5", "N=10", "N=20"],
    ["date", "machine", "commit", "threads", "mults", "params", "batch", "ours ms", "reference ms", "ours / ref"],
    ["date", "machine", "commit", "threads", "H", "D", "mults", "ours", "ours + fused AdamW", "reference",
     "speed-up (ours / fused)"],
)


def markdown(header, rows) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (2 threads on a busy 2-core machine is slow)")
    ap.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: every net and tensor on that device")
    args = ap.parse_args(argv)
    if args.device != "cpu":
        torch.set_default_device(args.device)  # nets, inputs and the samplers' buffers all follow
        args.threads = args.threads[:1]  # host threads barely matter for launch-bound CUDA work
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for n in args.threads:  # each thread setting is written as soon as it is measured
        torch.set_num_threads(n)
        r = 5 if args.quick else 15
        overhead = sampler_overhead(r)
        latency = unet_latency(r)
        training = [] if args.skip_training else training_throughput(3 if args.quick else 7)
        new_rows = rows_for(n, overhead, latency, training)
        for header, rows in zip(HEADERS, new_rows):
            if rows:
                print(markdown(header, rows) + "\n", flush=True)
        if not args.no_write:
            for (section, description), header, rows in zip((OVERHEAD, LATENCY, TRAINING), HEADERS, new_rows):
                if rows:
                    path = results.append_rows(section, description, header, rows)
            where = cpu_name() if args.device == "cpu" else f"{torch.cuda.get_device_name()} (host {cpu_name()})"
            note = (f"sampler_overhead, {n} thread(s){', --quick' if args.quick else ''}, on {where}, "
                    f"load average {load:.1f} at start: wall-clock medians include time descheduled by other "
                    f"jobs; the bracketed process-CPU figures do not (with 2 threads they sum both threads).")
            path.write_text(path.read_text().rstrip("\n") + f"\n\n{note}\n")
            print(f"appended to {path}")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
