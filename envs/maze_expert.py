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


class TimeOptimalController:
    """A near-time-optimal controller for PointMaze: the physical limit of a maze score.

    It takes the shortest path over the cell graph (BFS, as `WaypointExpert`), pulls the string
    through it (it heads for the farthest point of the path it can reach in a straight line with
    ``clearance`` from every wall, cutting corners), and tracks that line at full speed: the
    desired velocity points at the lookahead point with speed
    ``min(v_max, sqrt(v_turn^2 + 2 a_brake d))`` (``d`` its distance; ``v_turn = 0`` when it is
    the goal, so it brakes to rest on it), and the force is ``clip(gain (v_desired - v), -1, 1)``,
    near bang-bang. PointMaze's point accelerates by about 23.5 units/s^2 at full force and is
    clipped near 5.2 units/s; ``a_brake`` keeps a margin below the former. The defaults were
    chosen on tuning seeds 1000-1009 (medium / large mean return: clearance 0.2 468 / 647, 0.15
    478 / 654, 0.12 480 / 658, 0.1 482 / 661 with the ball grazing the walls; v_turn 1-4 and
    a_brake 15-20 moved it by under 2%).

    Same protocol as `WaypointExpert`: ``reset(mask=None)``, ``act(obs)`` for one env or a batch.
    """

    def __init__(self, maze: Maze, *, clearance: float = 0.12, v_max: float = 5.0,
                 v_turn: float = 3.0, a_brake: float = 20.0, gain: float = 5.0, step: float = 0.05,
                 observation_space: gym.Space | None = None, action_space: gym.Space | None = None):
        if clearance < 0 or v_max <= 0 or a_brake <= 0 or gain <= 0 or step <= 0:
            raise ValueError("need clearance >= 0 and v_max, a_brake, gain, step > 0")
        self.maze = maze
        self.clearance, self.v_max, self.v_turn = float(clearance), float(v_max), float(v_turn)
        self.a_brake, self.gain, self.step = float(a_brake), float(gain), float(step)
        box = lambda n: gym.spaces.Box(-np.inf, np.inf, shape=(n,), dtype=np.float64)
        self.observation_space = observation_space or gym.spaces.Dict(
            {"observation": box(4), "achieved_goal": box(2), "desired_goal": box(2)})
        self.action_space = action_space or gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        walls = np.argwhere(maze.maze_map == 1)
        centres = maze.cell_to_xy(walls[:, 0], walls[:, 1])
        half = maze.scaling / 2
        self._wall_lo, self._wall_hi = centres - half, centres + half  # (W, 2) wall boxes

    def reset(self, mask=None) -> None:
        """Stateless: every action is computed from the current observation."""

    def _clear(self, points: np.ndarray) -> np.ndarray:
        """``points (..., 2)`` -> bool: at least ``clearance`` from every wall box."""
        p = points[..., None, :]
        gap = np.maximum(np.maximum(self._wall_lo - p, p - self._wall_hi), 0.0)
        return (np.einsum("...wi,...wi->...w", gap, gap) >= self.clearance ** 2).all(-1)

    def _path_points(self, xy: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """Centres of the cells on the BFS path after the current one, ending at the goal."""
        cols = self.maze.shape[1]
        goal_cell = int(self.maze.cell_index(goal))
        cur = int(self.maze.cell_index(xy))
        points = []
        while cur != goal_cell and len(points) <= self.maze.maze_map.size:
            cur = int(self.maze.next_cell[goal_cell, cur])
            points.append(self.maze.cell_to_xy(*divmod(cur, cols)))
        if points:
            points[-1] = goal
        else:
            points.append(goal)
        return np.asarray(points)

    def _lookahead(self, xy: np.ndarray, points: np.ndarray) -> int:
        """Index of the farthest path point reachable from xy along a clear straight line."""
        best = 0
        for j in range(len(points)):
            n = max(int(np.linalg.norm(points[j] - xy) / self.step), 1)
            seg = xy + np.linspace(0.0, 1.0, n + 1)[:, None] * (points[j] - xy)
            if self._clear(seg[1:]).all():
                best = j
        return best

    def act(self, obs) -> np.ndarray:
        """``obs`` dict -> action (2,) for a single env or (B, 2) for a batch."""
        state = np.asarray(obs["observation"], dtype=np.float64)
        single = state.ndim == 1
        state = state.reshape(-1, state.shape[-1])
        goals = np.asarray(obs["desired_goal"], dtype=np.float64).reshape(-1, 2)
        actions = np.empty((len(state), 2))
        for i, (s, goal) in enumerate(zip(state, goals)):
            xy, vel = s[:2], s[2:4]
            points = self._path_points(xy, goal)
            j = self._lookahead(xy, points)
            offset = points[j] - xy
            dist = float(np.linalg.norm(offset))
            v_end = 0.0 if j == len(points) - 1 else self.v_turn
            speed = min(self.v_max, np.sqrt(v_end ** 2 + 2 * self.a_brake * dist))
            v_des = offset / max(dist, 1e-9) * speed if dist > 1e-6 else np.zeros(2)
            actions[i] = np.clip(self.gain * (v_des - vel), -1.0, 1.0)
        return actions[0] if single else actions

    def __repr__(self) -> str:
        return (f"TimeOptimalController(maze={self.maze.shape}, clearance={self.clearance}, "
                f"v_max={self.v_max}, v_turn={self.v_turn}, a_brake={self.a_brake})")
