"""Measure a policy's ``act`` in a control loop: latency, decisions/s, network evaluations.

Used by ``diffplan bench`` and ``benchmarks/runtime.py``. The network-evaluation count and the
sampler overhead come from forward hooks on the policy's denoiser (``policy.net``), so they count
what really ran; the overhead ratio is (time of a whole replan) / (time inside the network).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class BenchResult:
    batch: int
    device: str
    steps: int | None
    warm_start: bool
    act_p50_ms: float
    act_p99_ms: float
    decisions_per_s: float  # env decisions per second (batch / mean act latency)
    plan_p50_ms: float  # a replan alone (every call replans)
    plan_p99_ms: float
    plan_p10_ms: float  # near a quiet machine's time, where other load deschedules the p50
    net_evals_per_plan: float
    net_evals_per_decision: float  # with the policy's action queue
    sampler_overhead: float  # replan time / time inside the network forward passes
    cuda_graph: bool = False  # plans replayed from CUDA graphs (PlannerConfig.cuda_graph)

    def as_dict(self) -> dict:
        return asdict(self)


@contextmanager
def _net_timer(policy):
    """Count calls and time spent inside the policy's networks (``policy.net`` if present)."""
    nets = [m for m in (getattr(policy, "net", None),) if m is not None]
    state = {"calls": 0, "time": 0.0, "t0": 0.0}

    def sync():  # never inside a CUDA-graph capture, where a sync is an error
        if policy.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()

    def pre(_m, _a):
        sync()
        state["t0"] = time.perf_counter()

    def post(_m, _a, _o):
        sync()
        state["calls"] += 1
        state["time"] += time.perf_counter() - state["t0"]

    handles = [h for n in nets for h in (n.register_forward_pre_hook(pre), n.register_forward_hook(post))]
    try:
        yield state
    finally:
        for h in handles:
            h.remove()


def example_observations(policy, batch: int, seed: int = 0):
    """Observations for ``batch`` envs, from the task's eval env when it is known."""
    spec = policy.spec
    if spec.task:
        from diffplan.envs import get_task

        env = get_task(spec.task).make_env()
        obs = [env.reset(seed=seed + i)[0] for i in range(batch)]
        env.close()
        if isinstance(obs[0], dict):
            return {k: np.stack([o[k] for o in obs]) for k in obs[0]}
        return np.stack(obs)
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, spec.obs_dim)).astype(np.float32)


def bench_policy(policy, batch: int = 1, calls: int = 200, steps: int | None = None,
                 warm_start: bool | None = None, seed: int = 0, cuda_graph: bool | None = None) -> BenchResult:
    """Time ``policy.act`` over ``calls`` decisions at ``batch`` envs (observations held fixed).

    ``steps``, ``warm_start``, ``cuda_graph``: override the runtime config for this run (None: as
    configured). With CUDA graphs the network hooks do not fire inside a replay, so a captured
    row's network columns count only eager plans; its latencies are what counts."""
    if batch < 1 or calls < 1:
        raise ValueError(f"bench_policy needs batch >= 1 and calls >= 1, got batch={batch}, calls={calls}")
    planner = policy.planner
    cfg = planner.config
    saved = (cfg.steps, cfg.warm_start, cfg.cuda_graph)
    if cuda_graph is not None:
        cfg.cuda_graph = cuda_graph
    if steps is not None:
        cfg.steps = steps
    if warm_start is not None:
        cfg.warm_start = warm_start
    obs = example_observations(policy, batch, seed)
    try:
        policy.reset(seed=seed)
        for _ in range(3):
            policy.act(obs)  # warm-up: allocator, caches, lazy init
        acts = []
        with _net_timer(policy) as nets:
            for _ in range(calls):
                t0 = time.perf_counter()
                policy.act(obs)
                acts.append((time.perf_counter() - t0) * 1e3)
            act_calls = nets["calls"]
        # replans alone: force a fresh plan on every call
        plans, net_time, plan_calls = [], 0.0, 0
        n_plans = max(10, calls // 10)
        for _ in range(n_plans):
            policy.reset(mask=np.ones(batch, dtype=bool)) if planner._plans is not None else policy.reset()
            with _net_timer(policy) as nets:
                t0 = time.perf_counter()
                policy.act(obs)
                plans.append((time.perf_counter() - t0) * 1e3)
            net_time += nets["time"]
            plan_calls += nets["calls"]
    finally:
        cfg.steps, cfg.warm_start, cfg.cuda_graph = saved
    a, p = np.asarray(acts), np.asarray(plans)
    return BenchResult(
        batch=batch, device=str(policy.device), steps=steps if steps is not None else cfg.steps,
        warm_start=bool(warm_start if warm_start is not None else cfg.warm_start),
        act_p50_ms=float(np.percentile(a, 50)), act_p99_ms=float(np.percentile(a, 99)),
        decisions_per_s=float(batch / (a.mean() / 1e3)),
        plan_p50_ms=float(np.percentile(p, 50)), plan_p99_ms=float(np.percentile(p, 99)),
        plan_p10_ms=float(np.percentile(p, 10)),
        net_evals_per_plan=plan_calls / n_plans, net_evals_per_decision=act_calls / calls,
        sampler_overhead=float(p.sum() / 1e3 / net_time) if net_time > 0 else float("nan"),
        cuda_graph=bool(cfg.cuda_graph if cuda_graph is None else cuda_graph))


def format_table(results: list[BenchResult]) -> str:
    head = ["batch", "device", "steps", "warm", "graph", "act p50 ms", "act p99 ms", "decisions/s",
            "plan p50 ms", "net evals/plan", "net evals/decision", "overhead"]
    rows = [[str(r.batch), r.device, str(r.steps), "yes" if r.warm_start else "no", "yes" if r.cuda_graph else "no",
             f"{r.act_p50_ms:.3f}", f"{r.act_p99_ms:.3f}", f"{r.decisions_per_s:.0f}",
             f"{r.plan_p50_ms:.3f}", f"{r.net_evals_per_plan:.1f}", f"{r.net_evals_per_decision:.2f}",
             f"{r.sampler_overhead:.2f}"] for r in results]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
