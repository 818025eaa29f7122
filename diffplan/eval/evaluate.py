"""Roll a policy out on a task's evaluation protocol and score it.

``evaluate`` runs episodes in rounds of ``num_envs`` envs stepped in lockstep (one batched ``act``
per step, as with a ``gymnasium.vector`` env),
seeded ``seed, seed+1, ...`` per episode, so two policies evaluated with the same seed face the
same starts. Scores are D4RL-normalized against the task card's measured references.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class EvalReport:
    task: str
    policy: str
    episodes: int
    seed: int
    returns: list[float]
    lengths: list[int]
    successes: list[bool] | None
    normalized_mean: float
    normalized_stderr: float
    return_mean: float
    return_stderr: float
    success_rate: float | None
    latency_p50_ms: float  # one act() call for the whole batch of envs
    latency_p99_ms: float
    decisions_per_s: float  # env decisions per second of act() time (batch size / latency)
    num_envs: int
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)
    # per-episode traces for plots (not written to JSON): executed xy paths and planned paths
    paths: list = field(default_factory=list, repr=False)
    plans: list = field(default_factory=list, repr=False)

    def summary(self) -> str:
        s = (f"{self.task} | {self.policy} | {self.episodes} episodes: normalized score "
             f"{self.normalized_mean:.1f} ± {self.normalized_stderr:.1f} (return {self.return_mean:.1f})")
        if "optimal_normalized_mean" in self.extra:
            s += (f"; against the near-optimal controller {self.extra['optimal_normalized_mean']:.1f} ± "
                  f"{self.extra['optimal_normalized_stderr']:.1f}")
        if self.success_rate is not None:
            s += f", success {100 * self.success_rate:.0f}%"
        s += f" | act p50 {self.latency_p50_ms:.2f} ms, p99 {self.latency_p99_ms:.2f} ms, {self.decisions_per_s:.0f} decisions/s"
        return s

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("paths"), d.pop("plans")
        return d

    def write_metrics(self, checkpoint, keep_larger: bool = False) -> bool:
        """Write this report as ``metrics.json`` beside a checkpoint's weights, atomically, with a
        fingerprint of the weights and config it measured (``checkpoint_sha256``).
        ``keep_larger``: leave a metrics.json in place that comes from more episodes of the *same*
        checkpoint (a policy re-evaluated briefly beside others); one measured on other weights or
        another config, or with no fingerprint, is replaced. Returns whether it was written."""
        folder = Path(checkpoint)
        path = folder / "metrics.json"
        fingerprint = checkpoint_fingerprint(folder)
        if keep_larger:
            try:
                old = json.loads(path.read_text())
                same = old.get("checkpoint_sha256") == fingerprint
                if same and old.get("episodes", 0) > self.episodes:
                    return False
            except (OSError, ValueError, AttributeError):
                pass
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({**self.to_dict(), "checkpoint_sha256": fingerprint}, indent=2) + "\n")
        tmp.replace(path)
        return True

    def save(self, out_dir, video: bool = False) -> Path:
        """Write report.json and a PNG (the maze with planned and executed paths, or returns)."""
        from diffplan.eval.plots import plot_report

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        plot_report(self, out / "report.png")
        if video and self.paths:
            from diffplan.eval.plots import animate_episode

            animate_episode(self, out / "episode.gif")
        return out


def evaluate(policy, task, episodes: int = 100, num_envs: int = 10, seed: int = 0,
             record: int = 6, budget_ms: float | None = None, progress: bool = False) -> EvalReport:
    """Run ``episodes`` episodes of ``policy`` on ``task`` (a name or TaskCard); see module doc.

    ``record``: how many episodes keep their executed and planned paths for plots.
    """
    from diffplan.envs import get_task

    if episodes < 1 or num_envs < 1:
        raise ValueError(f"evaluate needs episodes >= 1 and num_envs >= 1, got {episodes} and {num_envs}")
    card = get_task(task) if isinstance(task, str) else task
    trained_for = getattr(getattr(policy, "spec", None), "task", None)
    if trained_for is not None and trained_for != card.name:
        raise ValueError(f"policy was trained for task {trained_for!r} but evaluation asked for {card.name!r}")
    num_envs = max(1, min(num_envs, episodes))
    # A synchronous batch of envs stepped in lockstep, like gymnasium's SyncVectorEnv, except that
    # an env whose episode ended is not stepped again (locomotion episodes end at different times).
    envs = [card.make_env() for _ in range(num_envs)]
    returns, lengths, successes, paths, plans, lat, sizes = [], [], [], [], [], [], []
    t_start = time.perf_counter()
    done_eps = 0
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=episodes, desc=f"eval {card.name}", disable=not progress, unit="ep")
        while done_eps < episodes:
            n = min(num_envs, episodes - done_eps)
            obs = [env.reset(seed=seed + done_eps + i)[0] for i, env in enumerate(envs)]
            _reset(policy, seed + done_eps)
            ret = np.zeros(num_envs)
            length = np.zeros(num_envs, dtype=np.int64)
            success = np.zeros(num_envs, dtype=bool)
            alive = np.ones(num_envs, dtype=bool)
            alive[n:] = False  # spare envs of the last round are not counted
            keep = [i for i in range(n) if done_eps + i < record]
            trace = {i: [] for i in keep}
            plan_trace = {i: [] for i in keep}
            while alive.any():
                batch = _stack(obs)
                t0 = time.perf_counter()
                action = policy.act(batch, budget_ms=budget_ms) if budget_ms else policy.act(batch)
                lat.append((time.perf_counter() - t0) * 1e3)
                sizes.append(num_envs)
                if keep:
                    _record(policy, batch, keep, trace, plan_trace)
                for i in np.flatnonzero(alive):
                    obs[i], reward, terminated, truncated, info = envs[i].step(action[i])
                    ret[i] += reward
                    length[i] += 1
                    success[i] |= bool(info.get("success", False))
                    alive[i] = not (terminated or truncated)
            returns += ret[:n].tolist()
            lengths += length[:n].tolist()
            successes += success[:n].tolist()
            for i in keep:
                paths.append(np.asarray(trace[i]))
                plans.append(plan_trace[i])
            done_eps += n
            bar.update(n)
        bar.close()
    finally:
        for env in envs:
            env.close()
    wall = time.perf_counter() - t_start
    r = np.asarray(returns, dtype=np.float64)
    lo, hi = card.ref_min_score, card.ref_max_score
    norm = 100.0 * (r - lo) / (hi - lo) if lo is not None and hi is not None else r
    sem = lambda a: float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0
    extra = {}
    optimal = getattr(card, "extras", {}).get("ref_optimal_score")
    if optimal is not None and lo is not None:  # the physical limit as a second 100 (mazes)
        norm_opt = 100.0 * (r - lo) / (optimal - lo)
        extra = {"ref_optimal_score": optimal, "optimal_normalized_mean": float(norm_opt.mean()),
                 "optimal_normalized_stderr": sem(norm_opt)}
    lat_a = np.asarray(lat)
    has_success = getattr(card, "is_goal_env", False)
    return EvalReport(
        task=card.name, policy=getattr(policy, "kind", type(policy).__name__), episodes=len(r), seed=seed,
        returns=r.tolist(), lengths=lengths, successes=successes if has_success else None,
        normalized_mean=float(norm.mean()), normalized_stderr=sem(norm),
        return_mean=float(r.mean()), return_stderr=sem(r),
        success_rate=float(np.mean(successes)) if has_success else None,
        latency_p50_ms=float(np.percentile(lat_a, 50)), latency_p99_ms=float(np.percentile(lat_a, 99)),
        decisions_per_s=float(np.sum(sizes) / (lat_a.sum() / 1e3)), num_envs=num_envs,
        ref_min_score=lo, ref_max_score=hi, wall_s=wall, extra=extra, paths=paths, plans=plans)


def _reset(policy, seed: int) -> None:
    """Start a round of episodes; policies whose ``reset`` takes a seed get one, so that plans are
    reproducible (env ``i`` of the round gets ``seed + i``)."""
    try:
        policy.reset(seed=seed)
    except TypeError:
        policy.reset()


def _stack(obs: list):
    """A list of per-env observations (arrays or dicts of arrays) as one batched observation."""
    if isinstance(obs[0], dict):
        return {k: np.stack([o[k] for o in obs]) for k in obs[0]}
    return np.stack(obs)


def _record(policy, obs, keep, trace, plan_trace) -> None:
    """Keep the executed xy positions and each new plan's states for the recorded envs."""
    o = obs["observation"] if isinstance(obs, dict) else obs
    for i in keep:
        trace[i].append(np.asarray(o[i], dtype=np.float32).copy())
    planner = getattr(policy, "planner", None)
    if planner is None or planner.last_steps == 0 or not hasattr(policy, "plan_states"):
        return
    import torch

    with torch.inference_mode():
        states = policy.plan_states(planner._plans).float().cpu().numpy()
    idx = planner._index
    for i in keep:
        if idx[i] == 1:  # this env replanned in the call that just returned
            plan_trace[i].append((len(trace[i]) - 1, states[i]))


def checkpoint_fingerprint(folder) -> str:
    """sha256 over a checkpoint's ``model.safetensors`` and ``config.yaml`` (the weights and the
    inference settings a score depends on); the empty string's hash where neither exists."""
    digest = hashlib.sha256()
    for name in ("model.safetensors", "config.yaml"):
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
