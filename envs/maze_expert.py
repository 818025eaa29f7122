"""The waypoint expert of D4RL maze2d / Minari pointmaze, batched for vector envs.

It plans over maze cells to the goal's cell (BFS shortest paths, as Q-iteration with 50 sweeps and
discount 0.99 would give), then steers to the next cell's centre, jittered by ``-U(0,1) * 0.2``
per axis, with a PD law and optional Gaussian action noise:

    a = clip(10 * (waypoint - xy) - 1.0 * velocity + noise * N(0, 1), -1, 1)

A waypoint is passed once the point is within 0.1 of it; on the goal's cell the waypoint is the
goal itself. A new goal (as in the dataset run, where the env moves the goal when it is reached)
replans from the current cell.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from diffplan.envs.maze_geometry import Maze


class WaypointExpert:
    """Waypoint controller over dict observations ``{'observation': [x, y, vx, vy], 'desired_goal':
    [gx, gy], ...}``, single (arrays of shape (4,), (2,)) or batched (leading B, as a Gymnasium
    vector env gives). Follows the policy protocol: `reset(mask=None)`, `act(obs)`, spaces.

    noise: std of the Gaussian action noise (0.5 for the datasets, 0 for the reference expert).
    seed: seeds the jitter and noise draws.
    """

    def __init__(self, maze: Maze, *, noise: float = 0.0, p_gain: float = 10.0,
                 d_gain: float = 1.0, switch_radius: float = 0.1, jitter: float = 0.2,
                 seed: int | np.random.SeedSequence | None = None,
                 observation_space: gym.Space | None = None,
                 action_space: gym.Space | None = None):
        if noise < 0 or jitter < 0 or switch_radius <= 0:
            raise ValueError("noise and jitter must be >= 0 and switch_radius > 0")
        self.maze = maze
        self.noise, self.p_gain, self.d_gain = float(noise), float(p_gain), float(d_gain)
        self.switch_radius, self.jitter = float(switch_radius), float(jitter)
        self.rng = np.random.default_rng(seed)
        box = lambda n: gym.spaces.Box(-np.inf, np.inf, shape=(n,), dtype=np.float64)
        self.observation_space = observation_space or gym.spaces.Dict(
            {"observation": box(4), "achieved_goal": box(2), "desired_goal": box(2)})
        self.action_space = action_space or gym.spaces.Box(-1.0, 1.0, shape=(2,),
                                                           dtype=np.float32)
        self._next_cell = maze.next_cell        # (C, C) BFS table
        self._centres = maze.cell_centres       # (C, 2)
        self._allocate(0)

    def _allocate(self, batch: int) -> None:
        self._goal = np.full((batch, 2), np.nan)           # goal the current plan is for
        self._goal_cell = np.zeros(batch, dtype=np.int64)
        self._target = np.zeros(batch, dtype=np.int64)     # cell of the current waypoint
        self._waypoint = np.zeros((batch, 2))

    def reset(self, mask=None) -> None:
        """Forget the plan of every env (mask None) or of the envs where ``mask: (B,)`` is True."""
        if mask is None:
            self._goal[:] = np.nan
        else:
            mask = np.asarray(mask, dtype=bool).reshape(-1)
            if len(mask) == len(self._goal):
                self._goal[mask] = np.nan

    def act(self, obs) -> np.ndarray:
        """``obs`` dict -> action (2,) for a single env or (B, 2) for a batch."""
        if not isinstance(obs, dict) or "observation" not in obs or "desired_goal" not in obs:
            raise ValueError("WaypointExpert.act expects the PointMaze dict observation with "
                             "'observation' and 'desired_goal'")
        state = np.asarray(obs["observation"], dtype=np.float64)
        single = state.ndim == 1
        state = state.reshape(-1, state.shape[-1])
        goal = np.asarray(obs["desired_goal"], dtype=np.float64).reshape(-1, 2)
        if state.shape[1] < 4 or len(goal) != len(state):
            raise ValueError(f"expected observation (B, 4) and desired_goal (B, 2), got "
                             f"{state.shape} and {goal.shape}")
        if len(state) != len(self._goal):
            self._allocate(len(state))
        xy, vel = state[:, :2], state[:, 2:4]

        # New goal (or no plan yet): plan from the current cell.
        fresh = ~(np.abs(goal - self._goal) <= 1e-3).all(axis=1)   # NaN goal -> fresh
        if fresh.any():
            idx = np.flatnonzero(fresh)
            self._goal[idx] = goal[idx]
            self._goal_cell[idx] = self.maze.cell_index(goal[idx])
            self._target[idx] = self._next_cell[self._goal_cell[idx],
                                                self.maze.cell_index(xy[idx])]
            self._set_waypoints(idx)

        # Waypoint reached: move on to the next cell of the path.
        offset = self._waypoint - xy
        reached = (np.einsum("bi,bi->b", offset, offset) <= self.switch_radius**2) & (
            self._target != self._goal_cell)
        if reached.any():
            idx = np.flatnonzero(reached)
            self._target[idx] = self._next_cell[self._goal_cell[idx], self._target[idx]]
            self._set_waypoints(idx)

        action = self.p_gain * (self._waypoint - xy) - self.d_gain * vel
        if self.noise > 0:
            action += self.noise * self.rng.standard_normal(action.shape)
        action = np.minimum(np.maximum(action, -1.0), 1.0)  # np.clip costs 3x more per call
        return action[0] if single else action

    def _set_waypoints(self, idx: np.ndarray) -> None:
        at_goal = self._target[idx] == self._goal_cell[idx]
        jittered = self._centres[self._target[idx]] - self.rng.uniform(
            size=(len(idx), 2)) * self.jitter
        self._waypoint[idx] = np.where(at_goal[:, None], self._goal[idx], jittered)

    def __repr__(self) -> str:
        return (f"WaypointExpert(maze={self.maze.shape}, noise={self.noise}, "
                f"switch_radius={self.switch_radius}, jitter={self.jitter})")
