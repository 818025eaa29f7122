"""PointMaze tasks (gymnasium-robotics ``PointMaze_*-v3``): cards, dataset recipe, eval protocol.

Dataset recipe (D4RL maze2d / Minari pointmaze style). One continuing run of the collection env
(``continuing_task=True, reset_target=True``, sparse reward) from a single seeded reset, driven
by the `WaypointExpert` with action noise 0.5, for 1,000,000 steps. When the point reaches the
goal the env draws a new one; the dataset is split into episodes there (``timeouts``).

Goal timing: the env moves its goal *after* computing the step's observation, so the step that
reaches the goal still shows the old ``desired_goal`` and the new one would appear one step late.
The recipe reads the env's goal after every step instead, so ``goals[i]`` is always the goal that
``rewards[i]`` is measured against, every episode ends on the step that reaches its goal (reward
1), and the next episode starts with its own goal.

Eval protocol: ``continuing_task=True, reset_target=False``, 300 / 600 / 800 steps, the goal in
D4RL's goal cell ((1, 1) / (6, 6) / (7, 9)) through `GoalCellWrapper`, a random start, sparse
reward. The goal position is still noised by +-0.25 per axis, so condition on
``obs['desired_goal']``. The return is the number of steps spent within 0.45 of the goal.

Reference returns are measured in that eval env (`measure_refs`, ``python -m
diffplan.envs.maze --measure-refs``): uniform random actions give ``ref_min``, the noise-free
`WaypointExpert` (BFS cell path, jittered cell-centre waypoints, switch within 0.1, PD 10 / 1)
gives ``ref_max``. The `TimeOptimalController` (shortest cell path, string-pulled, tracked at full
speed) gives ``extras['ref_optimal_score']``, the physical limit: scores are reported against both.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import cache

import gymnasium as gym
import numpy as np
from diffplan.envs.maze_expert import TimeOptimalController, WaypointExpert
from diffplan.envs.maze_geometry import Maze, pointmaze_map
from diffplan.envs.maze_geometry import draw_maze as _draw_maze
from diffplan.envs.tasks import TaskCard, get_task, register_task

from diffplan.data import OfflineDataset
from diffplan.data.minari_io import register_gymnasium_robotics

register_gymnasium_robotics()  # PointMaze_*-v3 ids

__all__ = ["GoalCellWrapper", "Maze", "WaypointExpert", "cell_to_xy", "collect_dataset",
           "draw_maze", "get_maze", "goal_pad_obs", "maze_map", "measure_refs", "xy_to_cell"]

DATASET_STEPS = 1_000_000
DATASET_SEED = 0
DATASET_NOISE = 0.5
REF_EPISODES = 100
REF_SEED = 0
GOAL_RADIUS = 0.45  # the env's success distance and sparse-reward radius

COLLECT_KWARGS = {"continuing_task": True, "reset_target": True, "reward_type": "sparse"}
EVAL_KWARGS = {"continuing_task": True, "reset_target": False, "reward_type": "sparse"}

# name: (env id, eval goal cell, eval steps, D4RL maze2d sparse refs (min, max), refs measured
# here (random, noise-free expert, near-time-optimal controller)). Measured by `measure_refs`
# (100 episodes, reset seeds 0..99, gymnasium-robotics 1.4.2, mujoco 4.0.0); mean +- std, success
# rate, first goal step:
#   umaze   random 12.98 +- 43.2   expert 217.01 +- 45.4  (100%, first hit  83.0)  optimal 234.73 +- 31.9 (100%,  65.3)
#   medium  random 19.45 +- 62.0   expert 436.43 +- 82.2  (100%, first hit 163.6)  optimal 495.22 +- 45.2 (100%, 104.8)
#   large   random  5.38 +- 22.0   expert 571.58 +- 108.2 (100%, first hit 228.4)  optimal 644.10 +- 71.6 (100%, 155.9)
# Against the near-optimal controller the noise-free expert scores 92.0 / 87.6 / 88.6.
_MAZES = {
    "umaze": ("PointMaze_UMaze-v3", (1, 1), 300, (23.85, 161.86), (12.98, 217.01, 234.73)),
    "medium": ("PointMaze_Medium-v3", (6, 6), 600, (13.13, 277.39), (19.45, 436.43, 495.22)),
    "large": ("PointMaze_Large-v3", (7, 9), 800, (6.7, 273.99), (5.38, 571.58, 644.10)),
}


class GoalCellWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Puts the goal in `goal_cell` (row, col) on every reset, by adding
    ``options={'goal_cell': ...}``; the start stays random. Recorded in the env spec, so
    ``gym.make(env.spec)`` rebuilds it."""

    def __init__(self, env: gym.Env, goal_cell):
        gym.utils.RecordConstructorArgs.__init__(self, goal_cell=[int(c) for c in goal_cell])
        gym.Wrapper.__init__(self, env)
        self.goal_cell = np.array(goal_cell, dtype=np.int64)

    def reset(self, *, seed=None, options=None):
        return self.env.reset(seed=seed, options={"goal_cell": self.goal_cell, **(options or {})})


# ---- geometry helpers for planners and plots ------------------------------------------------

@cache
def _maze_by_name(name: str) -> Maze:
    return Maze(pointmaze_map(name))


def get_maze(task) -> Maze:
    """The `Maze` of a maze task (name or card)."""
    card = get_task(task)
    if card.family != "maze":
        raise ValueError(f"task '{card.name}' is not a maze task")
    return _maze_by_name(card.extras["map"])


def maze_map(task) -> np.ndarray:
    """(rows, cols) int array, 1 = wall, ``maze_map[row, col]`` with rows going down."""
    return get_maze(task).maze_map.copy()


def cell_to_xy(task, row, col) -> np.ndarray:
    """Centre xy of cell (row, col) of a maze task; vectorised over rows and cols."""
    return get_maze(task).cell_to_xy(row, col)


def xy_to_cell(task, xy) -> np.ndarray:
    """``xy: (..., 2)`` -> (..., 2) int (row, col) of a maze task."""
    return get_maze(task).xy_to_cell(xy)


def draw_maze(ax, task, *, show_goal: bool = True, **style):
    """Draw a maze task's walls (and its eval goal cell) on a matplotlib Axes, in env xy."""
    card = get_task(task)
    goal = card.extras["goal_cell"] if show_goal else None
    return _draw_maze(ax, get_maze(card), goal_cell=goal, **style)


def goal_pad_obs(last_obs: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """Window padding row ``[goal_x, goal_y, 0, 0]``: "arrived, and resting on the goal"."""
    return np.concatenate([np.asarray(goal, dtype=np.float32)[:2],
                           np.zeros(len(last_obs) - 2, dtype=np.float32)])


# ---- dataset recipe ---------------------------------------------------------------------------

def collect_dataset(card: TaskCard, steps: int, seed: int, progress: bool = True,
                    noise: float = DATASET_NOISE) -> OfflineDataset:
    """Run the recipe: `steps` steps of the noisy expert in one continuing run, split at goals."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    env = gym.make(card.env_id, **card.collect_kwargs)
    sim = env.unwrapped  # one run with no time limit: step the bare env (also ~25% faster)
    expert = WaypointExpert(get_maze(card), noise=noise, seed=np.random.SeedSequence([seed, 1]))
    obs, _ = sim.reset(seed=seed)
    obs_dim = obs["observation"].shape[0]
    observations = np.empty((steps + 1, obs_dim), dtype=np.float32)
    goals = np.empty((steps, 2), dtype=np.float32)
    actions = np.empty((steps, 2), dtype=np.float32)
    rewards = np.empty(steps, dtype=np.float32)
    observations[0] = obs["observation"]

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=f"collect {card.name}", unit="step", unit_scale=True)
    for i in range(steps):
        goals[i] = obs["desired_goal"]
        action = expert.act(obs)
        obs, reward, _, _, _ = sim.step(action)
        obs["desired_goal"] = sim.goal.copy()  # the goal now in force (see module docstring)
        observations[i + 1] = obs["observation"]
        actions[i] = action
        rewards[i] = reward
        if bar is not None and (i + 1) % 10_000 == 0:
            bar.update(10_000)
    if bar is not None:
        bar.update(steps - bar.n)
        bar.close()
    env.close()

    timeouts = np.zeros(steps, dtype=bool)
    timeouts[:-1] = (goals[1:] != goals[:-1]).any(axis=1)
    timeouts[-1] = True
    return OfflineDataset(
        observations=observations[:-1], actions=actions, rewards=rewards,
        terminals=np.zeros(steps, dtype=bool), timeouts=timeouts, goals=goals,
        next_observations=observations[1:],
        env_id=card.env_id, env_kwargs=dict(card.collect_kwargs),
        ref_min_score=card.ref_min_score, ref_max_score=card.ref_max_score,
        source=f"diffplan recipe {card.name}: waypoint expert, noise {noise}, seed {seed}, "
               f"{steps} steps", task=card.name)


# ---- eval env and reference scores ------------------------------------------------------------

def make_eval_env(card: TaskCard, render_mode: str | None = None) -> gym.Env:
    """The eval env: continuing, fixed goal cell, `card.episode_steps` steps, sparse reward."""
    env = gym.make(card.env_id, max_episode_steps=card.episode_steps, render_mode=render_mode,
                   **card.eval_kwargs)
    return GoalCellWrapper(env, card.extras["goal_cell"])


def make_expert(card: TaskCard, noise: float = 0.0, seed=None) -> WaypointExpert:
    """The noise-free reference expert (or a noisy one) for a maze task."""
    env = card.make_env()
    try:
        return WaypointExpert(get_maze(card), noise=noise, seed=seed,
                              observation_space=env.observation_space,
                              action_space=env.action_space)
    finally:
        env.close()


def run_episodes(card: TaskCard, policy, episodes: int = REF_EPISODES,
                 seed: int = REF_SEED) -> dict[str, np.ndarray]:
    """Roll `policy` (callable obs -> action, or an object with `reset`/`act`) for `episodes`
    episodes of the eval env, episode ``i`` reset with seed ``seed + i``. Returns per-episode
    ``returns`` and ``first_hit`` (first step within the goal radius, -1 if never)."""
    env = card.make_env()
    act = policy.act if hasattr(policy, "act") else policy
    returns, first_hit = np.zeros(episodes), np.full(episodes, -1)
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        if hasattr(policy, "reset"):
            policy.reset()
        for t in range(card.episode_steps + 1):
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            returns[ep] += reward
            if reward > 0 and first_hit[ep] < 0:
                first_hit[ep] = t
            if terminated or truncated:
                break
    env.close()
    return {"returns": returns, "first_hit": first_hit}


def measure_refs(task, episodes: int = REF_EPISODES, seed: int = REF_SEED) -> dict:
    """ref_min (uniform random actions) and ref_max (noise-free `WaypointExpert`) of a maze task,
    averaged over `episodes` seeded episodes of its eval env."""
    card = get_task(task)
    rng = np.random.default_rng(seed)
    random_policy = lambda obs: rng.uniform(-1.0, 1.0, size=2)
    rand = run_episodes(card, random_policy, episodes, seed)
    expert = run_episodes(card, make_expert(card, seed=seed), episodes, seed)
    optimal = run_episodes(card, TimeOptimalController(get_maze(card)), episodes, seed)
    hits = expert["first_hit"][expert["first_hit"] >= 0]
    return {
        "task": card.name, "episodes": episodes, "seed": seed,
        "random_mean": float(rand["returns"].mean()), "random_std": float(rand["returns"].std()),
        "expert_mean": float(expert["returns"].mean()),
        "expert_std": float(expert["returns"].std()),
        "expert_success": float((expert["first_hit"] >= 0).mean()),
        "expert_first_hit_mean": float(hits.mean()) if len(hits) else None,
        "optimal_mean": float(optimal["returns"].mean()),
        "optimal_std": float(optimal["returns"].std()),
        "optimal_success": float((optimal["first_hit"] >= 0).mean()),
        "optimal_first_hit_mean": float(optimal["first_hit"][optimal["first_hit"] >= 0].mean()),
    }


# ---- task cards -------------------------------------------------------------------------------

def _card(name: str) -> TaskCard:
    env_id, goal_cell, steps, (d4rl_min, d4rl_max), (ref_min, ref_max, ref_optimal) = _MAZES[name]
    return TaskCard(
        name=f"pointmaze-{name}",
        env_id=env_id,
        collect_kwargs=dict(COLLECT_KWARGS),
        eval_kwargs=dict(EVAL_KWARGS),
        episode_steps=steps,
        ref_min_score=ref_min,
        ref_max_score=ref_max,
        ref_note=(f"mean return over {REF_EPISODES} eval episodes (reset seeds "
                  f"{REF_SEED}..{REF_SEED + REF_EPISODES - 1}): ref_min = uniform random actions, "
                  "ref_max = noise-free WaypointExpert (BFS cell path, cell-centre waypoints "
                  "jittered by -U(0,1)*0.2, switch within 0.1, a = clip(10 (wp - xy) - vel)); "
                  "extras['ref_optimal_score'] = TimeOptimalController (BFS cell path, string-pulled, "
                  "tracked at full speed), the physical limit, a second 100; "
                  "python -m diffplan.envs.maze --measure-refs"),
        recipe=(f"one continuing run of {env_id} (continuing_task=True, reset_target=True, "
                f"sparse reward), {DATASET_STEPS:,} steps from one reset with seed "
                f"{DATASET_SEED}, WaypointExpert with action noise {DATASET_NOISE}; episodes "
                "split where the goal is reached and the env moves it"),
        dataset_steps=DATASET_STEPS,
        dataset_seed=DATASET_SEED,
        build_dataset=collect_dataset,
        build_env=make_eval_env,
        build_expert=make_expert,
        d4rl_ref_min_score=d4rl_min,
        d4rl_ref_max_score=d4rl_max,
        is_goal_env=True,
        family="maze",
        extras={"map": name, "goal_cell": goal_cell, "goal_radius": GOAL_RADIUS,
                "ref_optimal_score": ref_optimal},
    )


if __name__ != "__main__":  # under `python -m`, main() below imports the registered module
    for _name in _MAZES:
        register_task(_card(_name))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffplan.envs.maze",
                                     description="PointMaze task utilities")
    parser.add_argument("--measure-refs", action="store_true",
                        help="measure ref_min / ref_max of the maze tasks in their eval envs")
    parser.add_argument("--tasks", nargs="*", default=[f"pointmaze-{n}" for n in _MAZES])
    parser.add_argument("--episodes", type=int, default=REF_EPISODES)
    parser.add_argument("--seed", type=int, default=REF_SEED)
    args = parser.parse_args(argv)
    if not args.measure_refs:
        parser.print_help()
        return 0
    for task in args.tasks:
        start = time.perf_counter()
        refs = measure_refs(task, args.episodes, args.seed)
        refs["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(refs), flush=True)
    return 0


if __name__ == "__main__":
    from diffplan.envs import (
        maze as _registered,  # the module whose cards are registered
    )
    raise SystemExit(_registered.main())
