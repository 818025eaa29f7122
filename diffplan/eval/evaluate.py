"""Roll a policy out on a task's evaluation protocol, or on any Gymnasium env, and score it.

``evaluate`` runs episodes in rounds of ``num_envs`` envs stepped in lockstep (one batched ``act``
per step, as with a ``gymnasium.vector`` env),
seeded ``seed, seed+1, ...`` per episode, so two policies evaluated with the same seed face the
same starts. Scores are D4RL-normalized against the task card's measured references, or against
references given to ``evaluate``; without any, the "normalized" score is the raw return.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np

from diffplan.atomic import write_file
from diffplan.config import ConfigError


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
    # per-episode traces for plots (not written to JSON): executed xy paths and planned paths,
    # and the rendered frames of episode 0 (``evaluate(video=True)`` off mazes) at ``frame_fps``
    paths: list = field(default_factory=list, repr=False)
    plans: list = field(default_factory=list, repr=False)
    frames: list = field(default_factory=list, repr=False)
    frame_fps: float = field(default=30.0, repr=False)

    @property
    def normalized(self) -> bool:
        return self.ref_min_score is not None and self.ref_max_score is not None

    def summary(self) -> str:
        s = f"{self.task} | {self.policy} | {self.episodes} episodes: "
        if self.normalized:
            s += (f"normalized score {self.normalized_mean:.1f} ± {self.normalized_stderr:.1f} "
                  f"(return {self.return_mean:.1f})")
        else:
            s += f"return {self.return_mean:.1f} ± {self.return_stderr:.1f}"
        if self.normalized and "optimal_normalized_mean" in self.extra:
            s += (f"; against the near-optimal controller {self.extra['optimal_normalized_mean']:.1f} ± "
                  f"{self.extra['optimal_normalized_stderr']:.1f}")
        if self.success_rate is not None:
            s += f", success {100 * self.success_rate:.0f}%"
        s += f" | act p50 {self.latency_p50_ms:.2f} ms, p99 {self.latency_p99_ms:.2f} ms, {self.decisions_per_s:.0f} decisions/s"
        return s

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("paths", "plans", "frames", "frame_fps"):
            d.pop(key)
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
        write_file(path, json.dumps({**self.to_dict(), "checkpoint_sha256": fingerprint}, indent=2) + "\n")
        return True

    def save(self, out_dir, video: bool = False) -> Path:
        """Write report.json and a PNG (the maze with planned and executed paths, or returns);
        with ``video``, episode 0 as well: the rendered frames as episode.mp4 (episode.gif without
        imageio-ffmpeg), or for a maze its paths and plans drawn over the walls (episode.gif)."""
        from diffplan.eval.plots import animate_episode, plot_report, write_video

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        plot_report(self, out / "report.png")
        if video and self.frames:
            write_video(self.frames, out / "episode", self.frame_fps)
        elif video and self.paths:
            animate_episode(self, out / "episode.gif")
        return out


@dataclass
class EvalEnv:
    """What ``evaluate`` runs on: a task card, a Gymnasium env id, or one constructed env.

    ``make(render_mode)`` builds a fresh env (None when only ``env``, given by the caller, can be
    used); the references normalize the score (None: raw returns); mazes draw their videos from
    the recorded paths and plans instead of rendering."""

    name: str
    make: Callable[[str | None], gym.Env] | None
    env: gym.Env | None = None
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    is_goal_env: bool = False
    maze: bool = False
    task: str | None = None
    ref_optimal_score: float | None = None  # mazes: the near-time-optimal controller's return


def eval_env(env=None, policy=None, ref_min_score: float | None = None,
             ref_max_score: float | None = None) -> EvalEnv:
    """Resolve ``env``: a task name or ``TaskCard`` (its eval protocol and references), a
    Gymnasium env id, or a constructed ``gym.Env``. None: the policy's task, else the env its
    dataset recorded (id and kwargs, from the Minari metadata). References given here override."""
    from diffplan.data.minari_io import register_gymnasium_robotics
    from diffplan.envs import TaskCard, UnknownTaskError, get_task, list_tasks

    kwargs = {}
    if env is None:
        spec = getattr(policy, "spec", None)
        env = getattr(spec, "task", None) or getattr(spec, "env_id", None)
        if not env:
            raise UnknownTaskError("the policy names no task or env id; give one: evaluate(policy, env_or_id)")
        kwargs = dict(spec.env_kwargs or {}) if not spec.task else {}
    if isinstance(env, str) and env in list_tasks():
        env = get_task(env)
    if isinstance(env, TaskCard):
        lo, hi = env.ref_min_score, env.ref_max_score
        target = EvalEnv(env.name, env.make_env, None, lo, hi, env.is_goal_env, env.family == "maze", env.name,
                         env.extras.get("ref_optimal_score"))
    elif isinstance(env, str):
        register_gymnasium_robotics()
        try:
            gym.spec(env)
        except gym.error.Error:
            raise UnknownTaskError(f"{env!r} is neither a diffplan task ({', '.join(list_tasks())}) nor a "
                                   "registered Gymnasium env id") from None
        target = EvalEnv(env, lambda mode, env_id=env: gym.make(env_id, **{**kwargs, "render_mode": mode}))
        probe = target.make(None)
        target.is_goal_env = isinstance(probe.observation_space, gym.spaces.Dict)
        probe.close()
    elif isinstance(env, gym.Env):
        target = EvalEnv(env.spec.id if env.spec else type(env.unwrapped).__name__, None, env,
                         is_goal_env=isinstance(env.observation_space, gym.spaces.Dict))
    else:
        raise TypeError(f"evaluate expects a task name, TaskCard, Gymnasium env id or env, got {type(env).__name__}")
    if (ref_min_score is None) != (ref_max_score is None):
        raise ConfigError("give both references, the returns that score 0 and 100, or neither")
    if ref_min_score is not None:
        target.ref_min_score, target.ref_max_score = ref_min_score, ref_max_score
    return target


def evaluate(policy, env=None, episodes: int = 100, num_envs: int = 10, seed: int = 0,
             record: int = 6, budget_ms: float | None = None, progress: bool = False,
             video: bool = False, ref_min_score: float | None = None,
             ref_max_score: float | None = None) -> EvalReport:
    """Run ``episodes`` episodes of ``policy`` on ``env`` (see :func:`eval_env`; default: the
    policy's own task or env); see the module doc.

    A constructed env runs alone (``num_envs`` 1) and stays open; pass an id for parallel envs.
    ``record``: how many episodes keep their executed and planned paths for plots.
    ``video``: also render episode 0 offscreen into ``report.frames`` (mazes are drawn from the
    recorded paths instead); a constructed env must have ``render_mode="rgb_array"``.
    ``ref_min_score`` / ``ref_max_score``: references that map returns to 0 / 100.
    """
    if episodes < 1 or num_envs < 1:
        raise ValueError(f"evaluate needs episodes >= 1 and num_envs >= 1, got {episodes} and {num_envs}")
    target = eval_env(env, policy, ref_min_score, ref_max_score)
    trained_for = getattr(getattr(policy, "spec", None), "task", None)
    if target.task is not None and trained_for is not None and trained_for != target.task:
        raise ConfigError(f"policy was trained for task {trained_for!r} but evaluation asked for {target.task!r}")
    render = video and not target.maze
    if target.env is not None:
        num_envs = 1
        if render and target.env.render_mode != "rgb_array":
            raise ConfigError("a video of a constructed env needs it made with render_mode='rgb_array'")
    num_envs = max(1, min(num_envs, episodes))
    # A synchronous batch of envs stepped in lockstep, like gymnasium's SyncVectorEnv, except that
    # an env whose episode ended is not stepped again (locomotion episodes end at different times).
    envs = [target.env] if target.env is not None else [
        target.make("rgb_array" if render and i == 0 else None) for i in range(num_envs)]
    fps = float(envs[0].metadata.get("render_fps") or 30)
    every = max(1, round(fps / 30))  # keep about 30 frames per second of episode time
    frames = []
    returns, lengths, successes, paths, plans, lat, sizes = [], [], [], [], [], [], []
    t_start = time.perf_counter()
    done_eps = 0
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=episodes, desc=f"eval {target.name}", disable=not progress, unit="ep")
        while done_eps < episodes:
            n = min(num_envs, episodes - done_eps)
            obs = [e.reset(seed=seed + done_eps + i)[0] for i, e in enumerate(envs)]
            _reset(policy, seed + done_eps)
            ret = np.zeros(num_envs)
            length = np.zeros(num_envs, dtype=np.int64)
            success = np.zeros(num_envs, dtype=bool)
            alive = np.ones(num_envs, dtype=bool)
            alive[n:] = False  # spare envs of the last round are not counted
            keep = [i for i in range(n) if done_eps + i < record]
            trace = {i: [] for i in keep}
            plan_trace = {i: [] for i in keep}
            filming = render and done_eps == 0
            if filming:
                frames.append(_render(envs[0]))
            while alive.any():
                batch = _stack(obs)
                t0 = time.perf_counter()
                action = policy.act(batch, budget_ms=budget_ms) if budget_ms else policy.act(batch)
                lat.append((time.perf_counter() - t0) * 1e3)
                sizes.append(num_envs)
                if keep:
                    _record(policy, batch, keep, trace, plan_trace)
                film = filming and alive[0]
                for i in np.flatnonzero(alive):
                    obs[i], reward, terminated, truncated, info = envs[i].step(action[i])
                    ret[i] += reward
                    length[i] += 1
                    success[i] |= bool(info.get("success", False))
                    alive[i] = not (terminated or truncated)
                if film and (length[0] % every == 0 or not alive[0]):  # and the last frame
                    frames.append(_render(envs[0]))
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
        for made in envs:
            if made is not target.env:
                made.close()
    wall = time.perf_counter() - t_start
    r = np.asarray(returns, dtype=np.float64)
    lo, hi = target.ref_min_score, target.ref_max_score
    norm = 100.0 * (r - lo) / (hi - lo) if lo is not None and hi is not None else r
    sem = lambda a: float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0
    extra = {}
    optimal = target.ref_optimal_score
    if optimal is not None and lo is not None:  # the physical limit as a second 100 (mazes)
        norm_opt = 100.0 * (r - lo) / (optimal - lo)
        extra = {"ref_optimal_score": optimal, "optimal_normalized_mean": float(norm_opt.mean()),
                 "optimal_normalized_stderr": sem(norm_opt)}
    lat_a = np.asarray(lat)
    has_success = target.is_goal_env
    return EvalReport(
        task=target.name, policy=getattr(policy, "kind", type(policy).__name__), episodes=len(r), seed=seed,
        returns=r.tolist(), lengths=lengths, successes=successes if has_success else None,
        normalized_mean=float(norm.mean()), normalized_stderr=sem(norm),
        return_mean=float(r.mean()), return_stderr=sem(r),
        success_rate=float(np.mean(successes)) if has_success else None,
        latency_p50_ms=float(np.percentile(lat_a, 50)), latency_p99_ms=float(np.percentile(lat_a, 99)),
        decisions_per_s=float(np.sum(sizes) / (lat_a.sum() / 1e3)), num_envs=num_envs,
        ref_min_score=lo, ref_max_score=hi, wall_s=wall, extra=extra, paths=paths, plans=plans,
        frames=frames, frame_fps=fps / every)


def _render(env) -> np.ndarray:
    try:
        return env.render()
    except gym.error.DependencyNotInstalled as err:
        raise ConfigError(f"cannot render {env.spec.id if env.spec else 'the env'} for a video: {err}") from None


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
