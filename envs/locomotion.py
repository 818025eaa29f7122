"""Locomotion tasks (Hopper / HalfCheetah / Walker2d, Gymnasium v5) and their dataset recipes.

The datasets follow D4RL's recipes, made locally from the behavior actors shipped under
``checkpoints/behavior/<family>/step-<N>/`` (SB3 SAC trained here, see :mod:`diffplan.envs.behavior`):

``<family>-medium``
    1M steps of the *medium* snapshot, stochastic actions (``tanh(mu + std * eps)``, the way SAC
    acts while collecting). The medium snapshot is the shipped one whose evaluated D4RL score is
    closest to the mean score of D4RL's own medium datasets (44 / 40 / 62 for hopper /
    halfcheetah / walker2d), i.e. about a third of expert.
``<family>-medium-replay``
    What SAC's replay buffer held when training reached the medium snapshot at step ``M``. The
    buffer holds the same number of env steps from every stretch of training, so each behavior
    contributes steps in proportion to the training steps it covered: uniform random actions for
    ``[0, learning_starts)`` (SB3 SAC's warm-up), then snapshot ``s_j`` (stochastic) for
    ``[s_j, s_{j+1})`` up to ``M`` -- a snapshot stands in for the policies trained after it
    until the next shipped snapshot. Later stretches weigh more when the shipped snapshots are
    spaced further apart late in training. ``M`` steps in total (D4RL's are 0.2M - 0.4M).
``<family>-medium-expert``
    The medium dataset (same seed, identical arrays) followed by 1M steps of the *expert*
    snapshot (the best shipped one), 2M in total.

Every episode is cut at 1000 steps (``timeouts``); ``terminals`` come from the env. Rollouts run
``num_envs`` envs side by side with one batched actor call per step; given the shipped weights,
the seed and ``num_envs`` the arrays are identical from run to run.

Eval uses 1000-step episodes. Scores are D4RL-normalized with D4RL's reference returns; the
random-policy return measured in the v5 env is kept beside them (``random_return_v5``).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import yaml

from .behavior import D4RL_REF, TanhGaussianActor, load_actor

EPISODE_STEPS = 1000
LEARNING_STARTS = 10_000  # SB3 SAC warm-up with uniform random actions (rl-zoo setting)
FAMILIES = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
# Mean D4RL-normalized score of D4RL's medium datasets (REFERENCES.md): the medium target.
MEDIUM_TARGET = {"hopper": 44.0, "halfcheetah": 40.0, "walker2d": 62.0}
# Return of uniform random actions in the v5 env: mean over 100 episodes of <= 1000 steps,
# reset seeds 0..99, action_space seeded with the episode index (measure_random_return()).
RANDOM_RETURN_V5 = {"hopper": 17.04, "halfcheetah": -267.71, "walker2d": 1.93}
# Snapshots pinned once training is done (None: chosen from the shipped snapshots' yaml).
PINNED = {
    "hopper": {"medium": "step-110000", "expert": "step-180000"},  # 48.6 and 109.6 D4RL-normalized
    "halfcheetah": {"medium": "step-100000", "expert": "step-310000"},  # 42.0 and 69.8 (best of 310k steps)
    # walker2d: medium = the first snapshot past the medium level (67.1; D4RL's medium policies were
    # early-stopped too), expert = the best of 400k steps (76.5; D4RL's expert is 100)
    "walker2d": {"medium": "step-260000", "expert": "step-330000"},
}
# Dataset versions. v0: the snapshots of checkpoints/behavior (the data every shipped policy was
# trained on; cards "<family>-<kind>"). v1 (issue #23): SAC slowed down so that it reaches the
# medium level at D4RL's replay-buffer sizes (checkpoints/behavior-v1, a snapshot every 10k steps;
# cards "<family>-<kind>-v1"). A v1 medium snapshot is the run's first one past MEDIUM_TARGET (D4RL
# stopped its medium policies early); an expert is reused from v0 only where it reaches D4RL's expert
# level (EXPERT_TARGET). v1 cards exist only where their behaviors do.
BEHAVIOR_DIRS = {0: "checkpoints/behavior", 1: "checkpoints/behavior-v1"}
EXPERT_TARGET = {"hopper": 100.0, "halfcheetah": 90.0, "walker2d": 100.0}
# An expert pin is (version, run folder, snapshot): the folder under that version's BEHAVIOR_DIRS
# (the family's own run, or another run of the family such as halfcheetah-tqc).
PINNED_V1 = {
    # 2 gradient steps per 3 env steps: first past 44 at 290k (53.8); v0's expert (109.6)
    "hopper": {"medium": "step-290000", "expert": (0, "hopper", "step-180000")},
    # 1 gradient step per 2 env steps: first past 40 at 150k (44.0); expert: a TQC run (rl-zoo
    # settings, checkpoints/behavior-v1/halfcheetah-tqc/), the first snapshot past 90: 590k (90.7;
    # 90.7 +- 0.2 over 20 other episodes)
    "halfcheetah": {"medium": "step-150000", "expert": (1, "halfcheetah-tqc", "step-590000")},
    # 2 gradient steps per 3 env steps, resumed at 300k and 900k: first past 62 at 400k (72.1);
    # expert: the run's best, 102.0 at 1.2M
    "walker2d": {"medium": "step-400000", "expert": (1, "walker2d", "step-1200000")},
}
# D4RL's datasets (issue #23; REFERENCES.md): env steps and mean normalized episode return; None
# where not recorded here. The v1 targets: means within 25%, medium-replay 0.15M-0.5M steps.
D4RL_DATASETS = {
    "hopper": {"medium": (1_000_000, 44.0), "medium-replay": (400_000, 15.0), "medium-expert": (2_000_000, None)},
    "halfcheetah": {"medium": (1_000_000, 40.0), "medium-replay": (200_000, 27.0),
                    "medium-expert": (2_000_000, None)},
    "walker2d": {"medium": (1_000_000, 62.0), "medium-replay": (300_000, 15.0), "medium-expert": (2_000_000, None)},
}
DEFAULT_SEED = 0
DEFAULT_NUM_ENVS = 16
KINDS = ("medium", "medium-replay", "medium-expert")


# MuJoCo >= 3.3 warns on every load of Gymnasium's half_cheetah.xml (its `settotalmass`
# compiler attribute is deprecated, the model is unchanged); one line per env is noise in
# progress output, so that one message is dropped while envs are made here.
_QUIET_MUJOCO = ("compiler attribute 'settotalmass' is deprecated",)


@contextmanager
def quiet_mujoco_compiler():
    """Drop MuJoCo's known-harmless model-compiler warnings (``_QUIET_MUJOCO``) inside the block;
    any other MuJoCo warning still goes to the previous handler (or stderr, MuJoCo's default)."""
    try:
        import mujoco
    except ImportError:  # pragma: no cover - mujoco is a dependency of the envs
        yield
        return
    prev = mujoco.get_mju_user_warning()

    def handler(msg: str) -> None:
        if any(q in msg for q in _QUIET_MUJOCO):
            return
        if prev is not None:
            prev(msg)
        else:
            print(f"WARNING: {msg}", file=sys.stderr)

    mujoco.set_mju_user_warning(handler)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(prev)


def make_env(env_id: str, **kwargs):
    """``gym.make(env_id, **kwargs)`` without MuJoCo's known-harmless compiler warnings."""
    import gymnasium as gym

    with quiet_mujoco_compiler():
        return gym.make(env_id, **kwargs)


def behavior_dir(version: int = 0) -> Path:
    """The shipped ``checkpoints/behavior`` (``behavior-v1`` for ``version`` 1; repository or
    installed package data, see :mod:`diffplan.resources`; override of v0: ``DIFFPLAN_BEHAVIOR_DIR``)."""
    from diffplan.resources import PACKAGE_DIR, shipped

    if version not in BEHAVIOR_DIRS:
        raise ValueError(f"unknown locomotion dataset version {version}; known: {sorted(BEHAVIOR_DIRS)}")
    env = os.environ.get("DIFFPLAN_BEHAVIOR_DIR")
    if env and version == 0:
        return Path(env)
    rel = BEHAVIOR_DIRS[version]
    return shipped(rel) or PACKAGE_DIR / rel


# --------------------------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    step: int
    path: Path
    score: float | None  # D4RL-normalized eval score (deterministic actor) from actor.yaml
    ret: float | None


def list_snapshots(family: str, root: Path | None = None) -> list[Snapshot]:
    root = Path(root or behavior_dir()) / family
    snaps = []
    if not root.is_dir():
        return snaps
    for d in root.iterdir():
        if not (d.is_dir() and d.name.startswith("step-") and (d / "actor.yaml").exists()):
            continue
        with open(d / "actor.yaml") as f:
            meta = yaml.safe_load(f)
        snaps.append(Snapshot(int(meta["train_step"]), d, meta.get("d4rl_score"),
                              meta.get("eval_return_mean")))
    return sorted(snaps, key=lambda s: s.step)


def snapshot_ref(snap: Snapshot) -> str:
    """Where a snapshot lives, as ``<behavior dir>/<run folder>/<step>``: e.g. ``behavior/hopper/step-180000``
    or ``behavior-v1/halfcheetah-tqc/step-...`` (a v1 expert may be another version's or another run's)."""
    return "/".join(snap.path.parts[-3:])


def _by_name(snaps: list[Snapshot], name: str) -> Snapshot:
    for s in snaps:
        if s.path.name == name:
            return s
    raise FileNotFoundError(f"pinned behavior snapshot {name} is not shipped")


def _snapshots(family: str, root: Path | None, version: int) -> list[Snapshot]:
    snaps = list_snapshots(family, root or behavior_dir(version))
    if not snaps:
        raise FileNotFoundError(f"no behavior snapshots for {family} under {root or behavior_dir(version)}")
    return snaps


def medium_snapshot(family: str, root: Path | None = None, version: int = 0) -> Snapshot:
    """v0: the snapshot scored closest to MEDIUM_TARGET; v1: the first one at or past it. Shipped
    snapshots (``root`` None) are pinned by name."""
    snaps = _snapshots(family, root, version)
    pins = PINNED if version == 0 else PINNED_V1
    if root is None and family in pins and pins[family]["medium"]:  # pins name shipped snapshots
        return _by_name(snaps, pins[family]["medium"])
    target = MEDIUM_TARGET[family]
    scored = [s for s in snaps if s.score is not None]
    if version == 0:
        return min(scored, key=lambda s: (abs(s.score - target), s.step))
    past = [s for s in scored if s.score >= target]
    if not past:
        raise FileNotFoundError(f"no {family} v1 behavior snapshot reaches the medium level ({target:g})")
    return past[0]


def expert_snapshot(family: str, root: Path | None = None, version: int = 0) -> Snapshot:
    """v0: the best snapshot (pinned when shipped); v1: its pin (which may name a v0 snapshot or
    another run's), else the best one if it reaches EXPERT_TARGET."""
    if version == 0:
        snaps = _snapshots(family, root, 0)
        if root is None and PINNED[family]["expert"]:
            return _by_name(snaps, PINNED[family]["expert"])
        scored = [s for s in snaps if s.score is not None]
        return max(scored, key=lambda s: (s.score, -s.step))
    pin = PINNED_V1.get(family, {}).get("expert") if root is None else None
    if pin:
        pin_version, folder, name = pin  # the pin's own version: a v1 expert may be a v0 snapshot
        return _by_name(_snapshots(folder, None, pin_version), name)
    best = max((s for s in _snapshots(family, root, version) if s.score is not None),
               key=lambda s: (s.score, -s.step))
    if best.score < EXPERT_TARGET[family]:
        raise FileNotFoundError(f"no {family} v1 expert: the best snapshot scores {best.score:.1f}, "
                                f"below D4RL's expert level ({EXPERT_TARGET[family]:g})")
    return best


# --------------------------------------------------------------------------------------------
# Rollouts
# --------------------------------------------------------------------------------------------

KEYS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")


def _empty(obs_dim: int, act_dim: int) -> dict[str, np.ndarray]:
    return {"observations": np.zeros((0, obs_dim), np.float32),
            "actions": np.zeros((0, act_dim), np.float32),
            "rewards": np.zeros((0,), np.float32), "terminals": np.zeros((0,), bool),
            "timeouts": np.zeros((0,), bool),
            "next_observations": np.zeros((0, obs_dim), np.float32)}


def concat(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in KEYS}


def rollout(env_id: str, actor: TanhGaussianActor | None, steps: int, seed: int,
            num_envs: int = DEFAULT_NUM_ENVS, deterministic: bool = False,
            max_episode_steps: int = EPISODE_STEPS, env_kwargs: dict | None = None,
            progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Exactly ``steps`` transitions of ``actor`` (None: uniform random actions) in ``env_id``.

    ``num_envs`` envs step side by side. Episodes are kept whole in the order they end (ties in
    env order); the last kept episode is cut to fit and its last step marked as a timeout.
    Episodes still running when the budget is met are dropped. Reset seeds and action noise come
    from ``seed`` only, so the result is a function of (weights, seed, num_envs).
    """
    envs = [make_env(env_id, max_episode_steps=max_episode_steps, **(env_kwargs or {}))
            for _ in range(num_envs)]
    space = envs[0].action_space
    low, high = space.low.astype(np.float32), space.high.astype(np.float32)
    obs_dim = int(np.prod(envs[0].observation_space.shape))
    act_dim = int(np.prod(space.shape))
    if steps <= 0:
        return _empty(obs_dim, act_dim)
    noise_rng = np.random.default_rng([seed, 0])
    reset_rng = np.random.default_rng([seed, 1])

    def reset(i):
        o, _ = envs[i].reset(seed=int(reset_rng.integers(2**31 - 1)))
        return np.asarray(o, np.float32)

    obs = np.stack([reset(i) for i in range(num_envs)])
    bufs = [[] for _ in range(num_envs)]  # per env: list of (o, a, r, term, trunc, o2)
    done_eps: list[dict[str, np.ndarray]] = []
    total = 0
    try:
        while total < steps:
            if actor is None:
                act = noise_rng.uniform(low, high, (num_envs, act_dim)).astype(np.float32)
            else:
                act = actor.act(obs, deterministic=deterministic, rng=noise_rng)
            for i, env in enumerate(envs):
                o2, r, term, trunc, _ = env.step(act[i])
                o2 = np.asarray(o2, np.float32)
                bufs[i].append((obs[i].copy(), act[i], r, term, trunc and not term, o2))
                if term or trunc:
                    b = bufs[i]
                    ep = {"observations": np.stack([t[0] for t in b]),
                          "actions": np.stack([t[1] for t in b]),
                          "rewards": np.asarray([t[2] for t in b], np.float32),
                          "terminals": np.asarray([t[3] for t in b], bool),
                          "timeouts": np.asarray([t[4] for t in b], bool),
                          "next_observations": np.stack([t[5] for t in b])}
                    done_eps.append(ep)
                    n = len(b)
                    total += n
                    if progress:
                        progress(min(n, max(steps - (total - n), 0)))
                    bufs[i] = []
                    obs[i] = reset(i)
                    if total >= steps:
                        break
                else:
                    obs[i] = o2
    finally:
        for env in envs:
            env.close()
    out = concat(done_eps)
    out = {k: v[:steps] for k, v in out.items()}
    last = steps - 1
    if not (out["terminals"][last] or out["timeouts"][last]):
        out["timeouts"][last] = True
    return out


def measure_random_return(env_id: str, episodes: int = 100) -> tuple[float, float]:
    """Mean and standard error of the uniform-random return (protocol of RANDOM_RETURN_V5)."""
    env = make_env(env_id, max_episode_steps=EPISODE_STEPS)
    rets = []
    for i in range(episodes):
        env.reset(seed=i)
        env.action_space.seed(i)
        total, done = 0.0, False
        while not done:
            _, r, term, trunc, _ = env.step(env.action_space.sample())
            total += float(r)
            done = term or trunc
        rets.append(total)
    env.close()
    return float(np.mean(rets)), float(np.std(rets) / np.sqrt(len(rets)))


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


@dataclass
class Segment:
    """``steps`` transitions of one behavior: a snapshot folder, or None for uniform random."""

    snapshot: Path | None
    steps: int
    seed: int
    label: str


def recipe(family: str, kind: str, steps: int | None = None, seed: int = DEFAULT_SEED,
           root: Path | None = None, version: int = 0) -> list[Segment]:
    """The segments a dataset is made of. ``steps`` rescales the recipe (tests use small ones);
    default 1M per behavior for medium / medium-expert, ``M`` for medium-replay."""
    if kind not in KINDS:
        raise KeyError(f"unknown locomotion dataset kind {kind!r}; one of {KINDS}")
    med = medium_snapshot(family, root, version)
    if kind == "medium":
        return [Segment(med.path, steps or 1_000_000, seed, f"medium:{med.path.name}")]
    if kind == "medium-expert":
        exp = expert_snapshot(family, root, version)
        n = (steps // 2) if steps else 1_000_000
        return [Segment(med.path, n, seed, f"medium:{med.path.name}"),
                Segment(exp.path, (steps - n) if steps else 1_000_000, seed + 1,
                        f"expert:{exp.path.name}")]
    # medium-replay: stretches of training time [b_k, b_{k+1}) up to the medium snapshot's step
    snaps = [s for s in list_snapshots(family, root or behavior_dir(version)) if s.step < med.step]
    bounds = sorted({0, LEARNING_STARTS, med.step}
                    | {s.step for s in snaps if LEARNING_STARTS < s.step < med.step})
    bounds = [b for b in bounds if b <= med.step]
    owners: list[Snapshot | None] = []
    for b in bounds[:-1]:
        before = [s for s in snaps if s.step <= b]
        owners.append(None if b < LEARNING_STARTS or not before else before[-1])
    if version >= 1:
        # v1: each stretch is rolled out by the snapshot that ends it, the policy SAC trained during
        # it (v0 keeps the one that starts it, so its arrays stay as they were). Measured against the
        # real buffer of the hopper v1 run up to 290k (2,138 episodes, mean normalized return 12.1):
        # end snapshots 2,099 / 12.3; half start, half end 2,389 / 10.7; start snapshots 2,634 / 9.6.
        at = {s.step: s for s in snaps} | {med.step: med}
        owners = [o if o is None else at.get(stop, o) for o, stop in zip(owners, bounds[1:])]
    lengths = np.diff(bounds)
    total = int(lengths.sum())
    if steps:  # rescale, keeping every stretch's share
        lengths = np.floor(lengths * steps / total).astype(int)
        lengths[-1] += steps - lengths.sum()
    segs = []
    for j, (owner, n) in enumerate(zip(owners, lengths)):
        if n <= 0:
            continue
        segs.append(Segment(None if owner is None else owner.path, int(n), seed + 1000 * (j + 1),
                            "random" if owner is None else f"replay:{owner.path.name}"))
    return segs


def generate(family: str, kind: str, steps: int | None = None, seed: int = DEFAULT_SEED,
             num_envs: int = DEFAULT_NUM_ENVS, progress: bool = True,
             root: Path | None = None, version: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays (D4RL keys) and a small info dict describing the recipe that made them."""
    import torch

    env_id = FAMILIES[family]
    segs = recipe(family, kind, steps, seed, root, version)
    total = sum(s.steps for s in segs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=task_name(family, kind, version), unit="step", smoothing=0.05)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batched MLP: threads only add overhead
    parts = []
    try:
        for s in segs:
            actor = None if s.snapshot is None else load_actor(s.snapshot)
            parts.append(rollout(env_id, actor, s.steps, s.seed, num_envs,
                                 progress=bar.update if bar else None))
    finally:
        torch.set_num_threads(prev_threads)
        if bar:
            bar.close()
    info = {"task": task_name(family, kind, version), "env_id": env_id, "seed": seed, "num_envs": num_envs,
            "segments": [{"behavior": s.label, "steps": s.steps, "seed": s.seed} for s in segs]}
    return concat(parts), info


def task_name(family: str, kind: str, version: int = 0) -> str:
    """``hopper-medium`` (v0) or ``hopper-medium-v1``."""
    return f"{family}-{kind}" + (f"-v{version}" if version else "")


def make_dataset(family: str, kind: str, steps: int | None = None, seed: int = DEFAULT_SEED,
                 num_envs: int = DEFAULT_NUM_ENVS, progress: bool = True, root: Path | None = None,
                 version: int = 0):
    """The task's dataset as a :class:`diffplan.data.OfflineDataset` (D4RL reference scores)."""
    import json

    from diffplan.data import OfflineDataset

    arrays, info = generate(family, kind, steps, seed, num_envs, progress, root, version)
    ref_min, ref_max = D4RL_REF[family]
    return OfflineDataset(**arrays, env_id=FAMILIES[family], env_kwargs={},
                          ref_min_score=ref_min, ref_max_score=ref_max,
                          source="diffplan.envs.locomotion " + json.dumps(info["segments"]),
                          task=task_name(family, kind, version))


def dataset_stats(data) -> dict:
    """What a task card records of its dataset (an :class:`OfflineDataset` with reference scores):
    env steps, episodes, and the mean / min / max D4RL-normalized episode return."""
    score = data.normalized_score(data.episode_returns())
    return {"steps": len(data), "episodes": data.num_episodes, "mean": round(float(score.mean()), 2),
            "min": round(float(score.min()), 2), "max": round(float(score.max()), 2)}


def prune_snapshots(family: str, keep: int = 8, root: Path | None = None,
                    dest: Path | None = None, dry_run: bool = False) -> tuple[list[str], list[str]]:
    """Keep at most ``keep`` snapshots of ``family`` in the shipped folder: the medium and expert
    ones, and evenly spaced ones before the medium step (what medium-replay rolls out). The rest
    move to ``dest`` (default ``runs/behavior/<family>/pruned``, git-ignored). Returns the names
    kept and moved."""
    root = Path(root or behavior_dir())
    snaps = list_snapshots(family, root)
    if len(snaps) <= keep:
        return [s.path.name for s in snaps], []
    med, exp = medium_snapshot(family, root), expert_snapshot(family, root)
    chosen = {med.step, exp.step}
    before = [s for s in snaps if s.step < med.step]
    slots = keep - len(chosen)
    if before and slots > 0:
        idx = np.unique(np.round(np.linspace(0, len(before) - 1, min(slots, len(before)))).astype(int))
        chosen |= {before[i].step for i in idx}
    kept = [s.path.name for s in snaps if s.step in chosen]
    moved = [s.path.name for s in snaps if s.step not in chosen]
    if not dry_run:
        dest = Path(dest or Path(__file__).resolve().parent.parent / "runs" / "behavior" / family
                    / "pruned")
        dest.mkdir(parents=True, exist_ok=True)
        for name in moved:
            target = dest / name
            if target.exists():
                import shutil

                shutil.rmtree(target)
            os.rename(root / family / name, target)
    return kept, moved


# --------------------------------------------------------------------------------------------
# Task cards
# --------------------------------------------------------------------------------------------


class BehaviorPolicy:
    """A shipped behavior actor as a policy (``reset`` / ``act``), batched over envs."""

    kind = "behavior"

    def __init__(self, actor: TanhGaussianActor, deterministic: bool = True, seed: int = 0):
        self.actor = actor
        self.deterministic = deterministic
        self.rng = np.random.default_rng(seed)

    def reset(self, mask=None) -> None:
        pass

    def act(self, obs, **_):
        return self.actor.act(obs, deterministic=self.deterministic, rng=self.rng)


def behavior_policy(family: str, role: str = "expert", deterministic: bool = True,
                    seed: int = 0) -> BehaviorPolicy:
    snap = expert_snapshot(family) if role == "expert" else medium_snapshot(family)
    return BehaviorPolicy(load_actor(snap.path), deterministic, seed)


_DESCRIPTIONS = {
    "medium": "1M steps of the medium SAC snapshot ({med}, the shipped snapshot whose D4RL score is "
              "closest to {target:g}), stochastic actions",
    "medium-v1": "1M steps of the medium SAC snapshot ({med}, the run's first snapshot whose D4RL score "
                 "reaches {target:g}), stochastic actions",
    "medium-replay": "SAC's replay buffer up to the medium snapshot ({med}, step {m}): uniform random "
                     "actions for the first 10k steps, then each shipped snapshot for the training "
                     "steps until the next one",
    "medium-replay-v1": "SAC's replay buffer up to the medium snapshot ({med}, step {m}): uniform random "
                        "actions for the first 10k steps, then each shipped snapshot for the training "
                        "steps up to it (since the one before)",
    "medium-expert": "the medium dataset (1M steps of {med}) then 1M steps of the expert snapshot "
                     "({exp}), stochastic actions",
}


_V1_WORDS = {
    "hopper": "SAC at 2 gradient steps per 3 env steps, a snapshot every 10k steps",
    "halfcheetah": "SAC at 1 gradient step per 2 env steps, a snapshot every 10k steps",
    "walker2d": "SAC at 2 gradient steps per 3 env steps, a snapshot every 10k steps",
}
# v1 experts trained another way than their family's run
_V1_EXPERT_WORDS = {"halfcheetah": "the expert from a TQC run (sb3-contrib, rl-zoo settings)"}
# What each made dataset holds (dataset_stats of the arrays `diffplan data make` writes; the tests
# check them against the arrays): env steps, complete episodes, mean / min / max D4RL-normalized
# episode return. D4RL's beside them: D4RL_DATASETS.
DATASET_STATS: dict[str, dict] = {
    "hopper-medium": {"steps": 1000000, "episodes": 2221, "mean": 45.93, "min": 1.89, "max": 97.44},
    "hopper-medium-replay": {"steps": 110000, "episodes": 2045, "mean": 4.07, "min": 0.68, "max": 54.72},
    "hopper-medium-expert": {"steps": 2000000, "episodes": 3380, "mean": 62.3, "min": 1.89, "max": 110.2},
    "hopper-medium-v1": {"steps": 1000000, "episodes": 1927, "mean": 56.11, "min": 14.53, "max": 111.51},
    "hopper-medium-replay-v1": {"steps": 290000, "episodes": 2102, "mean": 12.28, "min": 0.69, "max": 91.98},
    "hopper-medium-expert-v1": {"steps": 2000000, "episodes": 3086, "mean": 70.21, "min": 14.53, "max": 111.51},
    "halfcheetah-medium": {"steps": 1000000, "episodes": 1000, "mean": 40.2, "min": 2.55, "max": 43.91},
    "halfcheetah-medium-replay": {"steps": 100000, "episodes": 100, "mean": 16.6, "min": -1.5, "max": 39.68},
    "halfcheetah-medium-expert": {"steps": 2000000, "episodes": 2000, "mean": 53.61, "min": 2.55, "max": 69.7},
    "halfcheetah-medium-v1": {"steps": 1000000, "episodes": 1000, "mean": 41.38, "min": 16.83, "max": 43.18},
    "halfcheetah-medium-replay-v1": {"steps": 150000, "episodes": 150, "mean": 22.71, "min": -1.5, "max": 42.14},
    "halfcheetah-medium-expert-v1": {"steps": 2000000, "episodes": 2000, "mean": 63.64, "min": 10.05, "max": 90.55},
    "walker2d-medium": {"steps": 1000000, "episodes": 1157, "mean": 60.29, "min": 2.21, "max": 75.44},
    "walker2d-medium-replay": {"steps": 260000, "episodes": 4722, "mean": 1.92, "min": -0.29, "max": 69.51},
    "walker2d-medium-expert": {"steps": 2000000, "episodes": 2405, "mean": 59.82, "min": 1.05, "max": 79.18},
    "walker2d-medium-v1": {"steps": 1000000, "episodes": 1197, "mean": 65.1, "min": 8.06, "max": 87.3},
    "walker2d-medium-replay-v1": {"steps": 400000, "episodes": 1694, "mean": 13.25, "min": -0.29, "max": 84.14},
    "walker2d-medium-expert-v1": {"steps": 2000000, "episodes": 2225, "mean": 80.24, "min": 1.6, "max": 104.0},
}


def _build_dataset(card, steps: int, seed: int, progress: bool):
    family, kind = card.extras["behavior_family"], card.extras["kind"]
    if not list_snapshots(family, behavior_dir(card.dataset_version)):
        raise FileNotFoundError(f"{card.name} is made from the behavior snapshots in "
                                f"{BEHAVIOR_DIRS[card.dataset_version]}/{family}/, which are not here: they are in "
                                "the repository, not in the wheel; make it from a checkout")
    return make_dataset(family, kind, steps=steps, seed=seed, progress=progress,
                        version=card.dataset_version)


def _build_env(card, render_mode=None):
    # rendered through the model's "track" camera, which follows the robot (the default one does not)
    camera = {"camera_name": "track"} if render_mode in ("rgb_array", "depth_array") else {}
    return make_env(card.env_id, max_episode_steps=card.episode_steps, render_mode=render_mode,
                    **camera, **dict(card.eval_kwargs))


def _build_expert(card):
    return behavior_policy(card.extras["behavior_family"], "expert")


def _versions(family: str) -> list[tuple[int, tuple[str, ...]]]:
    """(version, kinds) of ``family``'s cards: v0, and v1 where it is pinned (medium-expert-v1 only
    with an expert at D4RL's level). A card is registered even where its behavior snapshots are not
    here (an installed wheel leaves the v1 ones out): its env and shipped policies work, and making
    its data says where the snapshots are."""
    out = [(0, KINDS)]
    if family in PINNED_V1:
        out.append((1, KINDS if PINNED_V1[family]["expert"] else ("medium", "medium-replay")))
    return out


def task_cards() -> list:
    """The nine locomotion cards (v0), and the v1 ones whose behaviors are shipped."""
    from .tasks import TaskCard

    cards = []
    for family, env_id in FAMILIES.items():
        lo, hi = D4RL_REF[family]
        for version, kinds in _versions(family):
            try:
                med = medium_snapshot(family, version=version)
                exp = expert_snapshot(family, version=version) if "medium-expert" in kinds else None
            except FileNotFoundError:
                med = exp = None
            for kind in kinds:
                if kind == "medium":
                    n = 1_000_000
                elif kind == "medium-expert":
                    n = 2_000_000
                else:
                    n = med.step if med else (DATASET_STATS.get(task_name(family, kind, version)) or {}).get("steps", 0)
                words = _DESCRIPTIONS.get(f"{kind}-v{version}", _DESCRIPTIONS[kind]).format(
                    med=med.path.name if med else "?", exp=snapshot_ref(exp) if exp else "?",
                    m=med.step if med else "?", target=MEDIUM_TARGET[family])
                if version:
                    words += f" ({BEHAVIOR_DIRS[version]}/{family}: {_V1_WORDS[family]})"
                    if kind == "medium-expert" and family in _V1_EXPERT_WORDS:
                        words += f"; {_V1_EXPERT_WORDS[family]}"
                name = task_name(family, kind, version)
                d4rl_steps, d4rl_mean = D4RL_DATASETS[family][kind]
                cards.append(TaskCard(
                    name=name, env_id=env_id, collect_kwargs={}, eval_kwargs={},
                    episode_steps=EPISODE_STEPS, ref_min_score=lo, ref_max_score=hi,
                    ref_note=(f"D4RL reference returns for {family} (random {lo:g}, expert {hi:g}); "
                              f"uniform random actions score {RANDOM_RETURN_V5[family]:g} in {env_id} "
                              "(100 episodes of <= 1000 steps, seeds 0-99)"),
                    recipe=(words + f"; episodes cut at {EPISODE_STEPS} steps (timeouts), terminals "
                            f"from the env; {DEFAULT_NUM_ENVS} envs side by side"),
                    dataset_steps=n, dataset_seed=DEFAULT_SEED,
                    build_dataset=_build_dataset, build_env=_build_env, build_expert=_build_expert,
                    d4rl_ref_min_score=lo, d4rl_ref_max_score=hi, is_goal_env=False,
                    family="locomotion", dataset_version=version,
                    extras={"behavior_family": family, "kind": kind,
                            "random_return_v5": RANDOM_RETURN_V5[family],
                            "medium_snapshot": med.path.name if med else None,
                            "expert_snapshot": snapshot_ref(exp) if exp else None,
                            "medium_target_d4rl_score": MEDIUM_TARGET[family],
                            "stats": DATASET_STATS.get(name),
                            "d4rl_stats": {"steps": d4rl_steps, "mean": d4rl_mean}}))
    return cards


def _register() -> None:
    from .tasks import register_task

    for card in task_cards():
        register_task(card, overwrite=True)


_register()


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m diffplan.envs.locomotion")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prune", help="keep at most N shipped snapshots per family")
    pr.add_argument("family", choices=list(FAMILIES))
    pr.add_argument("--keep", type=int, default=8)
    pr.add_argument("--dry-run", action="store_true")
    sub.add_parser("snapshots", help="list shipped snapshots and the medium / expert choice")
    ca = sub.add_parser("calibrate", help="evaluate snapshots with stochastic actions (as the "
                        "datasets act) to pick and pin the medium / expert snapshots")
    ca.add_argument("family", choices=list(FAMILIES))
    ca.add_argument("--episodes", type=int, default=10)
    ca.add_argument("--min-step", type=int, default=0)
    a = p.parse_args(argv)
    if a.cmd == "prune":
        kept, moved = prune_snapshots(a.family, a.keep, dry_run=a.dry_run)
        print("kept:", " ".join(kept))
        print("moved:" if not a.dry_run else "would move:", " ".join(moved))
    elif a.cmd == "calibrate":
        from .behavior import d4rl_normalized, evaluate_actor

        for snap in list_snapshots(a.family):
            if snap.step < a.min_step:
                continue
            m, sd, _ = evaluate_actor(load_actor(snap.path), FAMILIES[a.family], a.episodes,
                                      seed=20_000, deterministic=False)
            print(f"{snap.path.name:12s} deterministic d4rl {snap.score:6.1f} | stochastic return "
                  f"{m:8.1f} +- {sd:6.1f}  d4rl {d4rl_normalized(FAMILIES[a.family], m):6.1f}",
                  flush=True)
    else:
        for fam in FAMILIES:
            snaps = list_snapshots(fam)
            if not snaps:
                print(f"{fam}: none")
                continue
            med, exp = medium_snapshot(fam), expert_snapshot(fam)
            for s in snaps:
                role = ("medium " if s == med else "") + ("expert" if s == exp else "")
                print(f"{fam:12s} {s.path.name:12s} return {s.ret:8.1f}  d4rl {s.score:6.1f}  {role}")


if __name__ == "__main__":
    main()
