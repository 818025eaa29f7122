"""CUDA-graph capture of whole plans, for the runtime (``PlannerConfig.cuda_graph``).

A :class:`PlanGraphs` captures ``policy.plan(obs, goal, noise, warm=..., t_start=..., steps=...)``
once per key and replays it afterwards. It knows no policy; the key is what fixes a captured
plan's kernels: the shapes of obs / goal / noise / warm (so the batch size and a cold or warm
plan), the step count, ``t_start``, dtype, device and the autocast dtype. Each key owns static
input buffers, into which every call copies its inputs (the noise the Planner drew from each env's
own CPU generator included), and the static output the replay writes: the returned plans are
overwritten by the next replay of that key, so callers copy them out (the Planner does).

Falls back to eager ``policy.plan``, transparently:

* on a non-CUDA device (unless a capture backend was injected, as the tests do);
* for batch sizes outside ``batches`` (when given), or once ``max_graphs`` keys are captured;
* for a policy whose ``capture_problem()`` names a reason, or whose capture fails (e.g. a draw from
  a per-env CPU generator inside the plan, a host sync): one warning names why, then eager for good.

The capture backend is injectable: :class:`CudaGraphBackend` (warm-up on a side stream, then
``torch.cuda.graph``) in use, :class:`EagerBackend` in tests (runs eagerly, counts captures and
replays), so the bookkeeping is tested on CPU.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Protocol

import torch

MAX_GRAPHS = 16  # each graph keeps a private memory pool


class CaptureFailed(RuntimeError):
    """The plan ran eagerly but could not be captured."""


class CaptureBackend(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Capture ``fn`` (which reads the static inputs): ``(replay, static output)``. Replaying
        recomputes the output from the current static inputs. Raises :class:`CaptureFailed`."""


class CudaGraphBackend:
    """``torch.cuda.CUDAGraph`` capture, as torch's CUDA-graph docs prescribe: ``warmup`` eager
    runs on a side stream, then the capture (with autocast's weight cache off, as the docs ask)."""

    def __init__(self, warmup: int = 3):
        self.warmup = warmup

    def capture(self, fn):
        if torch.is_autocast_enabled("cuda"):  # the autocast cache must not outlive a capture
            dtype = torch.get_autocast_dtype("cuda")
            inner, fn = fn, lambda: _no_autocast_cache(inner, dtype)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = fn()
        except Exception as e:  # any failure of the capture itself means "run eagerly"
            raise CaptureFailed(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from e
        return graph.replay, out


def _no_autocast_cache(fn, dtype):
    with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
        return fn()


class EagerBackend:
    """Stand-in backend: "captures" by running once, "replays" by running again into the static
    output. Counts both, so tests can check the bookkeeping without a GPU."""

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def capture(self, fn):
        self.captures += 1
        out = fn()
        with torch.inference_mode(False), torch.no_grad():  # writable by replays, in inference mode or not
            out = out.clone()

        def replay():
            self.replays += 1
            out.copy_(fn())

        return replay, out


class _Graph:
    """One captured plan: static inputs (None where the call has no such input), replay, output."""

    def __init__(self, inputs: dict[str, torch.Tensor | None]):
        with torch.inference_mode(False):  # plain tensors: writable inside and outside inference mode
            self.inputs = {k: None if v is None else v.clone() for k, v in inputs.items()}
        self.replay: Callable[[], None] | None = None
        self.out: torch.Tensor | None = None

    def load(self, inputs: dict[str, torch.Tensor | None]) -> None:
        for k, v in inputs.items():
            if v is not None:
                self.inputs[k].copy_(v)


class PlanGraphs:
    """Captured plans of one policy, one per key (see the module docstring)."""

    def __init__(self, backend: CaptureBackend | None = None, batches=None, max_graphs: int = MAX_GRAPHS):
        self.backend = backend  # None: CudaGraphBackend on CUDA tensors, eager elsewhere
        self.batches = None if batches is None else frozenset(int(b) for b in batches)
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Graph] = {}
        self.eager_calls = 0  # plans that ran eagerly (fallbacks)
        self.disabled: str | None = None  # why this policy plans eagerly for good

    def clear(self) -> None:
        """Forget every captured plan (e.g. after replacing a policy's modules: graphs read the
        parameters in place, so ``load_state_dict`` needs no clear, a new module does)."""
        self.graphs.clear()
        self.disabled = None

    @staticmethod
    def key(obs, goal, noise, warm, t_start: float, steps: int | None) -> tuple:
        shape = lambda x: None if x is None else tuple(x.shape)
        autocast = torch.get_autocast_dtype(obs.device.type) if torch.is_autocast_enabled(obs.device.type) else None
        return (shape(obs), shape(goal), shape(noise), shape(warm), float(t_start), steps, obs.dtype,
                str(obs.device), autocast)

    def plan(self, policy, obs: torch.Tensor, goal: torch.Tensor | None, noise: torch.Tensor, *,
             warm: torch.Tensor | None = None, t_start: float = 1.0, steps: int | None = None,
             generator=None) -> torch.Tensor:
        """``policy.plan(...)``, replayed from a captured graph where possible."""
        backend = self.backend or (CudaGraphBackend() if obs.device.type == "cuda" else None)
        kwargs = {} if warm is None else {"warm": warm, "t_start": t_start}
        key = self.key(obs, goal, noise, warm, t_start, steps)
        graph = self.graphs.get(key)
        if graph is None and backend is not None and not self.disabled and self._may_capture(policy, obs.shape[0]):
            graph = self._capture(backend, policy, key, obs, goal, noise, warm, t_start, steps)
        if graph is None:
            self.eager_calls += 1
            return policy.plan(obs, goal, noise, steps=steps, generator=generator, **kwargs)
        graph.load({"obs": obs, "goal": goal, "noise": noise, "warm": warm})
        graph.replay()
        return graph.out

    def _may_capture(self, policy, batch: int) -> bool:
        if self.batches is not None and batch not in self.batches:
            return False
        if len(self.graphs) >= self.max_graphs:
            return False
        problem = getattr(policy, "capture_problem", lambda: None)()
        if problem:
            self._disable(policy, problem)
            return False
        return True

    def _capture(self, backend, policy, key, obs, goal, noise, warm, t_start, steps) -> _Graph | None:
        graph = _Graph({"obs": obs, "goal": goal, "noise": noise, "warm": warm})
        s = graph.inputs
        kwargs = {} if warm is None else {"warm": s["warm"], "t_start": t_start}
        # Throwaway CPU generators: a policy that draws from them inside the plan cannot be
        # captured (the draw is a host copy) and falls back; the envs' own streams stay untouched.
        spare = [torch.Generator().manual_seed(0) for _ in range(obs.shape[0])]

        def run():
            return policy.plan(s["obs"], s["goal"], s["noise"], steps=steps, generator=spare, **kwargs)

        try:
            graph.replay, graph.out = backend.capture(run)
        except CaptureFailed as e:
            self._disable(policy, str(e))
            return None
        self.graphs[key] = graph
        return graph

    def _disable(self, policy, why: str) -> None:
        self.disabled = why
        warnings.warn(f"cuda_graph: {type(policy).__name__} plans eagerly: {why}", RuntimeWarning, stacklevel=4)
