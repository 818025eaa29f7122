"""Maze maps and geometry in gymnasium-robotics' PointMaze frame.

Frame (the pitfall worth writing down): ``maze_map[row][col]`` with rows going *down*; cell
(row, col) has its centre at ``x = (col + 0.5) * s - width * s / 2``,
``y = height * s / 2 - (row + 0.5) * s`` (s = cell size, 1 for PointMaze). This is
gymnasium-robotics' ``cell_rowcol_to_xy``; D4RL's maze2d uses a different frame.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import cached_property

import numpy as np

# 4-connected moves, (drow, dcol); their order breaks ties between equally short paths.
_MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))


def pointmaze_map(name: str) -> np.ndarray:
    """The gymnasium-robotics map ('umaze', 'medium', 'large') as an int array, 1 = wall."""
    from diffplan.data.minari_io import register_gymnasium_robotics

    register_gymnasium_robotics()  # quiet import
    from gymnasium_robotics.envs.maze import maps

    table = {"umaze": maps.U_MAZE, "medium": maps.MEDIUM_MAZE, "large": maps.LARGE_MAZE}
    if name not in table:
        raise ValueError(f"unknown PointMaze map '{name}'; choose from {', '.join(table)}")
    return np.array([[1 if c == 1 else 0 for c in row] for row in table[name]], dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Maze:
    """A grid maze: ``maze_map: (rows, cols)`` with 1 for wall cells, and the cell size."""

    maze_map: np.ndarray
    scaling: float = 1.0

    def __post_init__(self):
        grid = np.asarray(self.maze_map, dtype=np.int64)
        if grid.ndim != 2 or not np.isin(grid, (0, 1)).all():
            raise ValueError("maze_map must be a 2-D grid of 0 (free) and 1 (wall)")
        object.__setattr__(self, "maze_map", grid)

    @property
    def shape(self) -> tuple[int, int]:
        return self.maze_map.shape

    def cell_to_xy(self, row, col) -> np.ndarray:
        """Centre of cell(s) ``(row, col)`` -> ``(..., 2)`` xy."""
        rows, cols = self.shape
        row, col = np.asarray(row, dtype=np.float64), np.asarray(col, dtype=np.float64)
        x = (col + 0.5) * self.scaling - cols * self.scaling / 2
        y = rows * self.scaling / 2 - (row + 0.5) * self.scaling
        return np.stack([x, y], axis=-1)

    def xy_to_cell(self, xy) -> np.ndarray:
        """``xy: (..., 2)`` -> ``(..., 2)`` int64 (row, col), clipped to the grid."""
        rows, cols = self.shape
        xy = np.asarray(xy, dtype=np.float64)
        row = np.floor((rows * self.scaling / 2 - xy[..., 1]) / self.scaling)
        col = np.floor((xy[..., 0] + cols * self.scaling / 2) / self.scaling)
        return np.stack([np.clip(row, 0, rows - 1), np.clip(col, 0, cols - 1)],
                        axis=-1).astype(np.int64)

    def cell_index(self, xy) -> np.ndarray:
        """``xy: (..., 2)`` -> flat cell index ``row * cols + col``."""
        cell = self.xy_to_cell(xy)
        return cell[..., 0] * self.shape[1] + cell[..., 1]

    @cached_property
    def free_cells(self) -> np.ndarray:
        """(F, 2) int64 (row, col) of every free cell, row-major."""
        return np.argwhere(self.maze_map == 0)

    @cached_property
    def cell_centres(self) -> np.ndarray:
        """(rows * cols, 2) centre xy of every cell, by flat index."""
        rows, cols = np.divmod(np.arange(self.maze_map.size), self.shape[1])
        return self.cell_to_xy(rows, cols)

    @cached_property
    def next_cell(self) -> np.ndarray:
        """``(C, C)`` int64 table, C = rows * cols: ``next_cell[goal, cell]`` is the neighbour of
        `cell` one step closer to `goal` on a shortest 4-connected path (BFS). It is `cell` itself
        when `cell` is the goal, and `goal` when `cell` is a wall or cannot reach it."""
        rows, cols = self.shape
        size = rows * cols
        table = np.tile(np.arange(size), (size, 1))
        for goal in range(size):
            table[goal, :] = goal
            gr, gc = divmod(goal, cols)
            if self.maze_map[gr, gc]:
                continue
            dist = self._bfs(gr, gc)
            for r, c in self.free_cells:
                if (r, c) == (gr, gc) or dist[r, c] < 0:
                    continue
                best = min(
                    ((dr, dc) for dr, dc in _MOVES if self._free(r + dr, c + dc)
                     and 0 <= dist[r + dr, c + dc] < dist[r, c]),
                    key=lambda m: dist[r + m[0], c + m[1]])
                table[goal, r * cols + c] = (r + best[0]) * cols + (c + best[1])
            table[goal, goal] = goal
        return table

    def shortest_path(self, start, goal) -> list[tuple[int, int]]:
        """Cells (row, col) from `start` to `goal` inclusive, following `next_cell`."""
        cols = self.shape[1]
        cur, end = start[0] * cols + start[1], goal[0] * cols + goal[1]
        path = [divmod(int(cur), cols)]
        while cur != end and len(path) <= self.maze_map.size:
            cur = self.next_cell[end, cur]
            path.append(divmod(int(cur), cols))
        return path

    def _free(self, r: int, c: int) -> bool:
        rows, cols = self.shape
        return 0 <= r < rows and 0 <= c < cols and self.maze_map[r, c] == 0

    def _bfs(self, gr: int, gc: int) -> np.ndarray:
        dist = -np.ones(self.shape, dtype=np.int64)
        dist[gr, gc] = 0
        queue = deque([(gr, gc)])
        while queue:
            r, c = queue.popleft()
            for dr, dc in _MOVES:
                if self._free(r + dr, c + dc) and dist[r + dr, c + dc] < 0:
                    dist[r + dr, c + dc] = dist[r, c] + 1
                    queue.append((r + dr, c + dc))
        return dist


def draw_maze(ax, maze: Maze, *, goal_cell=None, wall_color: str = "0.25",
              floor_color: str = "0.97"):
    """Draw `maze`'s walls on a matplotlib Axes in env xy coordinates (paths drawn afterwards in
    xy line up with them). `goal_cell` (row, col) is marked with a star. Returns `ax`."""
    from matplotlib.patches import Rectangle

    rows, cols = maze.shape
    s = maze.scaling
    half_w, half_h = cols * s / 2, rows * s / 2
    ax.add_patch(Rectangle((-half_w, -half_h), 2 * half_w, 2 * half_h, color=floor_color,
                           zorder=0))
    for r, c in np.argwhere(maze.maze_map == 1):
        x, y = maze.cell_to_xy(r, c)
        ax.add_patch(Rectangle((x - s / 2, y - s / 2), s, s, color=wall_color, lw=0, zorder=1))
    if goal_cell is not None:
        gx, gy = maze.cell_to_xy(*goal_cell)
        ax.plot([gx], [gy], marker="*", ms=14, color="tab:red", zorder=5, ls="none")
    ax.set_xlim(-half_w, half_w)
    ax.set_ylim(-half_h, half_h)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax
