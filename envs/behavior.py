"""Behavior actors for locomotion datasets, and the script that trains them.

Run time (what the library needs): :class:`TanhGaussianActor`, a tiny torch module that
reproduces the actor of stable-baselines3's SAC (``latent_pi`` MLP with ReLU, ``mu`` and
``log_std`` heads, tanh squashing, scaled to the action space). It loads from a folder holding
``actor.safetensors`` (weights) and ``actor.yaml`` (shapes, action bounds, env id, training step,
evaluated return). Nothing is pickled and stable-baselines3 is not needed to load or run it.

Training (optional extra ``diffplan[behavior]``)::

    python -m diffplan.envs.behavior train --env Hopper-v5 --steps 200000 \
        --out checkpoints/behavior/hopper --snapshot-every 10000

trains SB3 SAC (``--algo tqc``: sb3-contrib's TQC) with the rl-zoo defaults for the MuJoCo tasks,
and at every snapshot evaluates the deterministic actor and writes
``<out>/step-<N>/actor.{safetensors,yaml}`` atomically, plus a row of ``<out>/progress.csv``. A
resumable SB3 state (its own ``model.zip`` + replay buffer ``.pkl``: SB3's internal format, never
shipped and never loaded by users) goes to ``runs/behavior/<env>/`` (git-ignored); ``--resume``
continues from it. A compact state without the replay buffer (safetensors + JSON, a few MB) goes to
``<out>/resume/``: committed with the snapshots, it lets a run of many hours continue on another
machine (see :func:`train`).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from diffplan import atomic

# SB3's clamp on the SAC actor's log std (stable_baselines3.sac.policies).
LOG_STD_MIN = -20.0
LOG_STD_MAX = 2.0

# D4RL reference returns (REFERENCES.md), keyed by the lower-case family name.
D4RL_REF = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}

WEIGHTS_FILE = "actor.safetensors"
META_FILE = "actor.yaml"


def env_family(env_id: str) -> str:
    """``"Hopper-v5" -> "hopper"``."""
    return env_id.split("-")[0].lower()


def d4rl_normalized(env_id: str, ret: float) -> float | None:
    ref = D4RL_REF.get(env_family(env_id))
    if ref is None:
        return None
    lo, hi = ref
    return float(100.0 * (ret - lo) / (hi - lo))


# --------------------------------------------------------------------------------------------
# Run-time actor
# --------------------------------------------------------------------------------------------


@dataclass
class ActorMeta:
    obs_dim: int
    act_dim: int
    hidden_sizes: list[int]
    action_low: list[float]
    action_high: list[float]
    env_id: str
    train_step: int = 0
    eval_return_mean: float | None = None
    eval_return_std: float | None = None
    eval_episodes: int | None = None
    d4rl_score: float | None = None
    d4rl_ref_min: float | None = None
    d4rl_ref_max: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActorMeta":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class TanhGaussianActor(nn.Module):
    """SB3 SAC's actor: ``a = low + (tanh(mu + std * eps) + 1) / 2 * (high - low)``.

    ``deterministic=True`` uses ``eps = 0``, which is what ``SAC.predict(obs, deterministic=True)``
    returns. Observations go in unnormalized, exactly as the Gymnasium env gives them.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes=(256, 256),
                 action_low=None, action_high=None, meta: ActorMeta | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        last = obs_dim
        for h in hidden_sizes:
            layers += [nn.Linear(last, h), nn.ReLU()]
            last = h
        self.latent_pi = nn.Sequential(*layers)
        self.mu = nn.Linear(last, act_dim)
        self.log_std = nn.Linear(last, act_dim)
        low = np.full(act_dim, -1.0) if action_low is None else np.asarray(action_low, np.float64)
        high = np.full(act_dim, 1.0) if action_high is None else np.asarray(action_high, np.float64)
        self.register_buffer("action_low", torch.as_tensor(low, dtype=torch.float32))
        self.register_buffer("action_high", torch.as_tensor(high, dtype=torch.float32))
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.meta = meta

    # -- torch API ---------------------------------------------------------------------------
    def dist_params(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.latent_pi(obs)
        return self.mu(h), torch.clamp(self.log_std(h), LOG_STD_MIN, LOG_STD_MAX)

    def forward(self, obs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Actions in the env's bounds; ``noise`` is standard normal (None = deterministic)."""
        mu, log_std = self.dist_params(obs)
        pre = mu if noise is None else mu + log_std.exp() * noise
        squashed = torch.tanh(pre)
        return self.action_low + 0.5 * (squashed + 1.0) * (self.action_high - self.action_low)

    # -- numpy API ---------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs, deterministic: bool = True, rng: np.random.Generator | None = None) -> np.ndarray:
        """Batched or single observation(s) -> float32 action(s) inside the action space.

        Stochastic actions draw their noise from ``rng`` (numpy), so a seeded generator gives
        the same actions on every run.
        """
        x = np.asarray(obs, dtype=np.float32)
        single = x.ndim == 1
        if single:
            x = x[None]
        noise = None
        if not deterministic:
            if rng is None:
                rng = np.random.default_rng()
            noise = torch.from_numpy(rng.standard_normal((x.shape[0], self.act_dim)).astype(np.float32))
        a = self.forward(torch.from_numpy(x), noise).numpy()
        return a[0] if single else a

    # -- I/O ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "TanhGaussianActor":
        """Load from a folder with ``actor.safetensors`` + ``actor.yaml``."""
        path = Path(path)
        with open(path / META_FILE) as f:
            meta = ActorMeta.from_dict(yaml.safe_load(f))
        actor = cls(meta.obs_dim, meta.act_dim, meta.hidden_sizes, meta.action_low,
                    meta.action_high, meta=meta)
        state = load_file(str(path / WEIGHTS_FILE))
        actor.load_state_dict(state)
        actor.eval()
        return actor

    def save(self, path: str | os.PathLike, meta: ActorMeta | None = None) -> Path:
        """Write ``actor.safetensors`` + ``actor.yaml`` into ``path`` atomically (tmp + rename)."""
        meta = meta or self.meta
        if meta is None:
            raise ValueError("an ActorMeta is needed to save an actor")
        path = Path(path)
        tmp = atomic.temp_sibling(path)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        with open(tmp / META_FILE, "w") as f:
            yaml.safe_dump(meta.to_dict(), f, sort_keys=False)
        atomic.swap_into_place(tmp, path)
        return path


# Names used elsewhere in the docs.
GaussianActor = TanhGaussianActor
TanhActor = TanhGaussianActor


def load_actor(path: str | os.PathLike) -> TanhGaussianActor:
    return TanhGaussianActor.load(path)


# --------------------------------------------------------------------------------------------
# SB3 export
# --------------------------------------------------------------------------------------------


def actor_from_sb3(model, env_id: str | None = None, **meta_kw) -> TanhGaussianActor:
    """Copy an SB3 SAC model's actor into a :class:`TanhGaussianActor` (no SB3 objects kept)."""
    sb3_actor = model.policy.actor
    if getattr(sb3_actor, "use_sde", False):
        raise ValueError("gSDE actors are not supported")
    space = model.action_space
    obs_dim = int(np.prod(model.observation_space.shape))
    act_dim = int(np.prod(space.shape))
    hidden = [m.out_features for m in sb3_actor.latent_pi if isinstance(m, nn.Linear)]
    acts = [type(m) for m in sb3_actor.latent_pi if not isinstance(m, nn.Linear)]
    if any(a is not nn.ReLU for a in acts):
        raise ValueError(f"only ReLU actors are supported, got {acts}")
    meta = ActorMeta(obs_dim=obs_dim, act_dim=act_dim, hidden_sizes=hidden,
                     action_low=[float(x) for x in space.low], action_high=[float(x) for x in space.high],
                     env_id=env_id or "", **meta_kw)
    actor = TanhGaussianActor(obs_dim, act_dim, hidden, space.low, space.high, meta=meta)
    src = sb3_actor.state_dict()
    dst = {}
    for k in actor.state_dict():
        if k in ("action_low", "action_high"):
            dst[k] = actor.state_dict()[k]
        else:
            dst[k] = src[k].detach().cpu().float().clone()
    actor.load_state_dict(dst)
    actor.eval()
    return actor


def export_sb3_actor(model, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Export an SB3 SAC actor to ``path/actor.safetensors`` + ``path/actor.yaml``.

    ``meta`` may hold ``env_id``, ``train_step``, ``eval_return_mean`` ... (see :class:`ActorMeta`);
    unknown keys go to ``extra``.
    """
    meta = dict(meta or {})
    env_id = meta.pop("env_id", None)
    known = {k: meta.pop(k) for k in list(meta) if k in ActorMeta.__dataclass_fields__}
    extra = known.pop("extra", {})
    extra.update(meta)
    actor = actor_from_sb3(model, env_id=env_id, extra=extra, **known)
    return actor.save(path)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate_actor(actor: TanhGaussianActor, env_id: str, episodes: int = 5, seed: int = 10_000,
                   deterministic: bool = True, max_steps: int = 1000) -> tuple[float, float, list[float]]:
    """Mean/std return over ``episodes`` episodes of at most ``max_steps`` steps."""
    import gymnasium as gym

    env = gym.make(env_id, max_episode_steps=max_steps)
    rng = np.random.default_rng(seed)
    returns = []
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            total, done = 0.0, False
            while not done:
                a = actor.act(obs, deterministic=deterministic, rng=rng)
                obs, r, term, trunc, _ = env.step(a)
                total += float(r)
                done = term or trunc
            returns.append(total)
    finally:
        env.close()
    return float(np.mean(returns)), float(np.std(returns)), returns


# --------------------------------------------------------------------------------------------
# Training (needs stable-baselines3)
# --------------------------------------------------------------------------------------------

# rl-zoo (hyperparams/sac.yml) for Hopper/HalfCheetah/Walker2d: MlpPolicy, learning_starts 10000,
# everything else SB3's SAC defaults, spelled out here so a change in SB3 defaults shows up.
SAC_HPARAMS = dict(
    learning_rate=3e-4,
    buffer_size=1_000_000,
    learning_starts=10_000,
    batch_size=256,
    tau=0.005,
    gamma=0.99,
    train_freq=1,
    gradient_steps=1,
    ent_coef="auto",
    policy_kwargs=dict(net_arch=[256, 256]),
)

PROGRESS_FIELDS = ["step", "eval_return_mean", "eval_return_std", "d4rl_score", "eval_episodes",
                   "wall_s", "steps_per_s", "snapshot"]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _truncate_progress(progress: Path, step: int) -> None:
    """Keep the header and the rows of ``progress`` up to env step ``step`` (atomically)."""
    import io

    from diffplan.atomic import write_file

    with open(progress, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
    if len(kept) < len(rows):
        text = io.StringIO()
        csv.writer(text).writerows(kept)
        write_file(progress, text.getvalue())


RESUME_DIR, RESUME_WEIGHTS, RESUME_META = "resume", "state.safetensors", "state.json"


def save_resume_state(model, path: str | os.PathLike, **meta: Any) -> Path:
    """Write what an SB3 SAC/TQC run needs to continue, without its replay buffer, to the folder
    ``path`` (replaced whole): the networks, their target copies, the Adam moments and the entropy
    coefficient as ``state.safetensors``, the step counters, optimizer settings and ``meta`` as
    ``state.json``. A few MB, so it can be committed beside the run's snapshots and a long run can
    continue on another machine (:func:`train` with ``resume``); nothing in it is pickled."""
    import json

    tensors, groups = {}, {}
    for name, sd in model.get_parameters().items():
        if name == "policy":
            tensors.update({f"policy/{k}": v.detach().cpu().contiguous() for k, v in sd.items()})
            continue
        groups[name] = sd["param_groups"]
        for i, st in sd["state"].items():
            tensors.update({f"{name}/{i}/{k}": torch.as_tensor(v).detach().cpu().contiguous()
                            for k, v in st.items()})
    tensors["log_ent_coef"] = model.log_ent_coef.detach().cpu().contiguous()
    info = dict(meta, num_timesteps=int(model.num_timesteps), n_updates=int(model._n_updates),
                episode_num=int(model._episode_num), train_freq=int(model.train_freq.frequency),
                gradient_steps=int(model.gradient_steps), learning_rate=float(model.learning_rate),
                learning_starts=int(model.learning_starts), param_groups=groups)
    path = Path(path)
    tmp = atomic.temp_sibling(path)
    save_file(tensors, str(tmp / RESUME_WEIGHTS))
    (tmp / RESUME_META).write_text(json.dumps(info, indent=1) + "\n")
    atomic.swap_into_place(tmp, path)
    return path


def read_resume_meta(path: str | os.PathLike) -> dict[str, Any]:
    import json

    f = Path(path) / RESUME_META
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{f}: not a readable resume state ({e})") from e


def load_resume_state(model, path: str | os.PathLike) -> dict[str, Any]:
    """Load :func:`save_resume_state`'s folder into ``model`` (made with the same algorithm and
    hyperparameters); returns its metadata. The replay buffer starts empty."""
    meta = read_resume_meta(path)
    tensors = load_file(str(Path(path) / RESUME_WEIGHTS))
    params: dict[str, Any] = {"policy": {k[len("policy/"):]: v for k, v in tensors.items() if k.startswith("policy/")}}
    for name, groups in meta["param_groups"].items():
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith(name + "/"):
                i, key = k[len(name) + 1:].split("/")
                state.setdefault(int(i), {})[key] = v
        params[name] = {"state": state, "param_groups": groups}
    model.set_parameters(params, exact_match=True, device="cpu")
    with torch.no_grad():
        model.log_ent_coef.copy_(tensors["log_ent_coef"])
    model.num_timesteps, model._n_updates = meta["num_timesteps"], meta["n_updates"]
    model._episode_num = meta["episode_num"]
    return meta


def train(env_id: str, steps: int, out: str | os.PathLike, snapshot_every: int = 10_000,
          seed: int = 0, eval_episodes: int = 5, state_dir: str | os.PathLike | None = None,
          resume: bool = False, threads: int = 1, state_every: int = 50_000,
          learning_starts: int | None = None, train_freq: int | None = None,
          learning_rate: float | None = None, gradient_steps: int | None = None,
          algo: str | None = None, refill: int = 50_000) -> None:
    """Train SB3 SAC (or sb3-contrib's TQC) on ``env_id`` for ``steps`` env steps, snapshotting the
    actor. With ``resume`` the steps are added to those already trained (SB3 keeps counting).

    ``train_freq``: one gradient step every ``train_freq`` env steps (rl-zoo: 1). A larger value
    slows learning per env step, so that the medium level is reached at D4RL's replay-buffer sizes
    (0.2-0.4M steps), and it makes each env step cheaper on a CPU. ``learning_rate`` replaces
    rl-zoo's 3e-4, the other way to slow it. ``gradient_steps`` per ``train_freq`` env steps (rl-zoo:
    1) sets ratios between integers, e.g. 2 per 3. ``None``: rl-zoo's 1 for a new run, the saved
    ratio for a resumed one; given with ``resume``, they change the ratio from here on (e.g. a run
    slowed to reach the medium level at D4RL's pace continues at full speed towards an expert).

    ``algo``: ``"sac"`` (the default for a new run) or ``"tqc"``, Truncated Quantile Critics
    (Kuznetsov et al. 2020) with rl-zoo's defaults: SAC's hyperparameters, plus 25 quantiles per
    critic of which the top 2 are dropped. Its actor is SAC's, so snapshots load as the same
    :class:`TanhGaussianActor`. rl-zoo's 1M-step HalfCheetah returns: TQC 12.1k, SAC 9.5k.

    Two states are saved every ``state_every`` steps. SB3's own (``model.zip`` + the replay buffer,
    hundreds of MB) goes to ``state_dir``, and ``resume`` continues from it exactly. The compact one
    (:func:`save_resume_state`, a few MB) goes to ``<out>/resume/``, so it can be committed with the
    snapshots. Where ``state_dir`` holds no state (a fresh machine), ``resume`` continues from the
    compact one. Its replay buffer is gone, so the run first collects ``refill`` env steps with its
    stochastic policy and no gradient steps, and counts them. Each such restart is recorded in the
    snapshots' metadata (``extra.buffer_refills``)."""
    try:
        import gymnasium as gym
        from stable_baselines3 import SAC
        from stable_baselines3.common.callbacks import BaseCallback
    except ImportError as e:  # pragma: no cover
        raise SystemExit("training needs stable-baselines3: pip install 'diffplan[behavior]'") from e

    if train_freq is not None and train_freq < 1:
        raise ValueError(f"train_freq must be >= 1 env steps per gradient step, got {train_freq}")
    if gradient_steps is not None and gradient_steps < 1:
        raise ValueError(f"gradient_steps must be >= 1, got {gradient_steps}")
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_dir = Path(state_dir or Path("runs/behavior") / env_family(env_id))
    state_dir.mkdir(parents=True, exist_ok=True)
    model_zip, buffer_pkl = state_dir / "model.zip", state_dir / "replay_buffer.pkl"
    resume_dir = out / RESUME_DIR
    saved = read_resume_meta(resume_dir) if resume and (resume_dir / RESUME_META).exists() else None
    if saved is not None and saved["env_id"] != env_id:
        raise ValueError(f"{resume_dir} holds a run on {saved['env_id']}, not {env_id}")
    saved_algo = saved["algo"] if saved is not None else ("sac" if resume and model_zip.exists() else None)
    if algo is not None and saved_algo is not None and algo != saved_algo:
        raise ValueError(f"--resume: the saved run is {saved_algo}, not {algo}")
    algo = algo or saved_algo or "sac"
    if algo not in ("sac", "tqc"):
        raise ValueError(f"algo must be 'sac' or 'tqc', got {algo!r}")
    algo_cls = SAC
    if algo == "tqc":
        try:
            from sb3_contrib import TQC as algo_cls
        except ImportError as e:  # pragma: no cover
            raise SystemExit("TQC needs sb3-contrib: pip install 'diffplan[behavior]'") from e
    refills = list(saved.get("buffer_refills", [])) if saved is not None else []

    env = gym.make(env_id)
    if resume and model_zip.exists():
        model = algo_cls.load(model_zip, env=env, device="cpu")
        if buffer_pkl.exists():
            model.load_replay_buffer(buffer_pkl)
        _log(f"resumed {env_id} at step {model.num_timesteps} from {state_dir}")
        if saved is not None and saved["num_timesteps"] != model.num_timesteps:
            refills = [r for r in refills if r <= model.num_timesteps]
    elif saved is not None:
        hp = dict(SAC_HPARAMS, **{k: saved[k] for k in ("train_freq", "gradient_steps", "learning_rate",
                                                          "learning_starts")})
        model = algo_cls("MlpPolicy", env, seed=saved.get("seed", seed), device="cpu", verbose=0, **hp)
        load_resume_state(model, resume_dir)
        if steps <= refill:
            raise ValueError(f"resuming without a replay buffer collects {refill} steps first; "
                             f"ask for more than that (--steps {steps})")
        _log(f"resumed {env_id} at step {model.num_timesteps} from {resume_dir} (no replay buffer: "
             f"collecting {refill} steps with the current policy first)")
    if resume and (model_zip.exists() or saved is not None):
        if train_freq is not None or gradient_steps is not None:
            from stable_baselines3.common.type_aliases import (
                TrainFreq,
                TrainFrequencyUnit,
            )

            if train_freq is not None:
                model.train_freq = TrainFreq(train_freq, TrainFrequencyUnit.STEP)
            if gradient_steps is not None:
                model.gradient_steps = gradient_steps
            _log(f"from here on {model.gradient_steps} gradient steps per {model.train_freq.frequency} env steps")
    else:
        hp = dict(SAC_HPARAMS)
        if learning_starts is not None:
            hp["learning_starts"] = learning_starts
        hp["train_freq"], hp["gradient_steps"] = train_freq or 1, gradient_steps or 1  # None: rl-zoo's 1
        if learning_rate is not None:
            hp["learning_rate"] = learning_rate
        model = algo_cls("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **hp)
    start_step = int(model.num_timesteps)
    progress = out / "progress.csv"
    if not progress.exists():
        with open(progress, "w", newline="") as f:
            csv.writer(f).writerow(PROGRESS_FIELDS)
    else:  # a resumed run redoes the steps after its saved state: drop their rows, kept once
        _truncate_progress(progress, start_step)

    def save_state():
        tmp_zip = state_dir / "model.tmp.zip"
        model.save(tmp_zip)
        os.replace(tmp_zip, model_zip)
        tmp_buf = state_dir / "replay_buffer.tmp.pkl"
        model.save_replay_buffer(tmp_buf)
        os.replace(tmp_buf, buffer_pkl)
        save_resume_state(model, resume_dir, algo=algo, env_id=env_id, seed=seed, buffer_refills=refills)

    t0 = time.time()

    class Snapshot(BaseCallback):
        def __init__(self):
            super().__init__()
            self.last_t, self.last_step = time.time(), int(model.num_timesteps)  # after any refill

        def _on_step(self) -> bool:
            n = self.model.num_timesteps
            if n % snapshot_every and n != start_step + steps:
                return True
            now = time.time()
            sps = (n - self.last_step) / max(now - self.last_t, 1e-9)
            actor = actor_from_sb3(self.model, env_id=env_id)
            mean, std, _ = evaluate_actor(actor, env_id, episodes=eval_episodes)
            score = d4rl_normalized(env_id, mean)
            ref = D4RL_REF.get(env_family(env_id), (None, None))
            actor.meta.train_step = int(n)
            actor.meta.eval_return_mean = mean
            actor.meta.eval_return_std = std
            actor.meta.eval_episodes = eval_episodes
            actor.meta.d4rl_score = score
            actor.meta.d4rl_ref_min, actor.meta.d4rl_ref_max = ref
            actor.meta.extra = {"algo": f"sb3-{algo}", "seed": seed, "train_freq": int(self.model.train_freq.frequency),
                                "learning_rate": float(self.model.learning_rate),
                                "gradient_steps": int(self.model.gradient_steps),
                                "eval_deterministic": True,
                                "eval_seed": 10_000, "eval_max_steps": 1000}
            if refills:
                actor.meta.extra["buffer_refills"] = list(refills)
            snap = out / f"step-{n}"
            actor.save(snap)
            wall = time.time() - t0
            with open(progress, "a", newline="") as f:
                csv.writer(f).writerow([n, f"{mean:.2f}", f"{std:.2f}",
                                        "" if score is None else f"{score:.2f}", eval_episodes,
                                        f"{wall:.1f}", f"{sps:.1f}", snap.name])
            _log(f"{env_id} step {n}: return {mean:.1f} +- {std:.1f} "
                 f"(d4rl {score if score is None else round(score, 1)}), {sps:.1f} steps/s, "
                 f"wall {wall / 60:.1f} min")
            if n % state_every == 0 or n == start_step + steps:
                save_state()
                _log(f"saved resumable SB3 state to {state_dir} and {resume_dir}")
            self.last_t, self.last_step = time.time(), n
            return True

    _log(f"training {algo.upper()} on {env_id} for {steps} steps (from {start_step}), threads={threads}")
    todo = steps
    if resume and not model_zip.exists() and saved is not None:  # no replay buffer: refill it first
        refills.append(start_step)
        kept, model.gradient_steps = model.gradient_steps, 0
        model.learn(total_timesteps=refill, reset_num_timesteps=False, progress_bar=False)
        model.gradient_steps, todo = kept, steps - refill
        _log(f"collected {refill} steps into the replay buffer; training again from {model.num_timesteps}")
    model.learn(total_timesteps=todo, callback=Snapshot(), reset_num_timesteps=not resume,
                progress_bar=False)
    env.close()
    _log(f"done {env_id}: {model.num_timesteps} steps in {(time.time() - t0) / 60:.1f} min")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m diffplan.envs.behavior")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train SB3 SAC (or TQC) and snapshot the actor")
    t.add_argument("--env", required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--snapshot-every", type=int, default=10_000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-episodes", type=int, default=5)
    t.add_argument("--state-dir", default=None, help="resumable SB3 state (default runs/behavior/<env>)")
    t.add_argument("--state-every", type=int, default=50_000)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--learning-starts", type=int, default=None, help="override (smoke tests)")
    t.add_argument("--train-freq", type=int, default=None,
                   help="env steps per gradient step (rl-zoo: 1; with --resume: change the saved run's)")
    t.add_argument("--learning-rate", type=float, default=None, help="SAC's learning rate (rl-zoo: 3e-4)")
    t.add_argument("--gradient-steps", type=int, default=None,
                   help="gradient steps per --train-freq env steps (default 1; with --resume: the saved run's)")
    t.add_argument("--algo", choices=("sac", "tqc"), default=None,
                   help="sac (rl-zoo's defaults; a new run's default) or tqc (sb3-contrib, rl-zoo's "
                        "defaults); with --resume: the saved run's")
    t.add_argument("--refill", type=int, default=50_000,
                   help="resuming from <out>/resume/ (no replay buffer): env steps collected first")
    e = sub.add_parser("eval", help="evaluate a shipped actor folder")
    e.add_argument("path")
    e.add_argument("--episodes", type=int, default=5)
    e.add_argument("--stochastic", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "train":
        train(a.env, a.steps, a.out, a.snapshot_every, a.seed, a.eval_episodes, a.state_dir,
              a.resume, a.threads, a.state_every, a.learning_starts, a.train_freq,
              a.learning_rate, a.gradient_steps, a.algo, a.refill)
    else:
        actor = load_actor(a.path)
        mean, std, rets = evaluate_actor(actor, actor.meta.env_id, a.episodes,
                                         deterministic=not a.stochastic)
        print(f"{actor.meta.env_id}: return {mean:.1f} +- {std:.1f}, "
              f"d4rl {d4rl_normalized(actor.meta.env_id, mean)}")


if __name__ == "__main__":
    main(sys.argv[1:])
