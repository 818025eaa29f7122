"""Fixed-length training windows over an `OfflineDataset`.

A window is H steps of one episode, consecutive or every ``stride``-th (a strided window spans
``(H - 1) * stride + 1`` steps: the keypoints of a coarse plan). Without padding it never runs
past the episode's end, so an episode shorter than its span gives no window. With padding every
step can start a window; the part past the episode's end is filled in (Diffuser's
``use_padding``): observations repeat the last observation (or ``pad_obs_fn(last_obs, goal)``,
e.g. the maze ``[goal_xy, 0, 0]``, which teaches "arrive, then rest"), actions and rewards are
zero, other keys repeat their last value, and ``mask`` is 0 there.

All index arithmetic is precomputed, so `sample` gathers a batch with one fancy index per key.
``windows.to(device)`` puts the arrays on a torch device (a GPU) and gathers batches there, drawn
with torch's generator: the training loop then copies nothing from the host (and a CUDA graph can
capture the sampling with the step). Both gather through one function, :func:`_gather`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from diffplan.data.dataset import ARRAY_KEYS, DatasetError, OfflineDataset

_OBS_KEYS = ("observations", "next_observations")
_ZERO_PAD_KEYS = ("actions", "rewards")


class SequenceWindows:
    """Windows of `horizon` steps; ``len()`` windows, ``ds[i]`` one, ``sample(B, rng)`` a batch.

    Output keys (shapes without the batch axis):
        each of `keys`: (H, dim) float32 (1-D arrays such as rewards become (H, 1));
        ``mask``: (H,) float32, 1 on real steps, 0 on padding;
        ``returns_to_go``: (H, 1) if asked, discounted sum of rewards from each step to the end
            of its episode (0 on padding);
        ``value``: (1,) if asked, the discounted return from the window's first step to the
            episode's end (Diffuser's value target);
        ``episode_return``: (1,) if asked, the undiscounted return of the window's whole episode
            (the return level of the behavior that made it; no time-left dependence);
        ``termination_penalty`` (None: none) is added to the reward of every terminal step (an
        episode that ended by ``terminals``, not by a timeout) in both, as Diffuser's -100;
        ``goal``: (goal_dim,) if asked, the dataset goal at the window's first step.
    `normalizers` maps array names (e.g. ``"observations"``, ``"goals"``) to fitted
    normalizers; those arrays are normalized once, here, and every output built from them
    (including ``goal`` for ``"goals"``) comes out normalized.
    """

    def __init__(self, dataset: OfflineDataset, horizon: int,
                 keys: Sequence[str] = ("observations", "actions"), pad: bool = False,
                 pad_obs_fn: Callable[[np.ndarray, np.ndarray | None], np.ndarray] | None = None,
                 returns_to_go: bool = False, value: bool = False, discount: float = 0.99,
                 goal: bool = False, normalizers: Mapping[str, object] | None = None,
                 stride: int = 1, termination_penalty: float | None = None, episode_return: bool = False):
        if not isinstance(horizon, (int, np.integer)) or horizon < 1:
            raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
        if not isinstance(stride, (int, np.integer)) or stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride!r}")
        if isinstance(keys, str):
            keys = (keys,)
        for key in keys:
            if key not in ARRAY_KEYS:
                raise DatasetError(f"unknown window key '{key}'; choose from {', '.join(ARRAY_KEYS)}")
            if getattr(dataset, key) is None:
                raise DatasetError(f"window key '{key}' asked for, but the dataset has no {key}")
        if goal and dataset.goals is None:
            raise DatasetError("goal=True, but the dataset has no goals (not a goal-env dataset)")
        if not 0.0 < discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        normalizers = dict(normalizers or {})
        for key in normalizers:
            if key not in ARRAY_KEYS or getattr(dataset, key) is None:
                raise DatasetError(f"normalizer given for '{key}', which is not an array of "
                                   "this dataset")
        self.dataset = dataset
        self.horizon = int(horizon)
        self.keys = tuple(keys)
        self.pad = bool(pad)
        self.stride = int(stride)
        span = (self.horizon - 1) * self.stride + 1  # steps a window covers
        self.discount = float(discount)
        self.want_rtg, self.want_value, self.want_goal = returns_to_go, value, goal

        starts, ends = dataset.episode_starts, dataset.episode_ends
        lengths = ends - starts
        # Window starts per episode: every step with padding, else those leaving H steps.
        n_per_ep = lengths if pad else np.maximum(lengths - span + 1, 0)
        ep_of_window = np.repeat(np.arange(len(starts)), n_per_ep)
        first = np.repeat(starts - np.concatenate([[0], np.cumsum(n_per_ep)[:-1]]), n_per_ep)
        self.starts = (np.arange(len(ep_of_window)) + first).astype(np.int64)  # (W,)
        self.ends = ends[ep_of_window]                                         # (W,) exclusive
        self.episode_of_window = ep_of_window
        if len(self.starts) == 0:
            strided = f" (stride {self.stride})" if self.stride > 1 else ""
            raise DatasetError(
                f"no window of horizon {self.horizon}{strided} fits: the longest episode has "
                f"{int(lengths.max())} steps (use pad=True or a shorter horizon)")

        # Source arrays, normalized once. Pad rows are built from raw data, then normalized.
        self._arrays: dict[str, np.ndarray] = {}
        needed = set(self.keys) | ({"goals"} if goal else set())
        for key in needed:
            arr = getattr(dataset, key)
            arr = arr.reshape(len(arr), -1).astype(np.float32)
            if key in normalizers:
                arr = np.asarray(normalizers[key].normalize(arr), dtype=np.float32)
            self._arrays[key] = arr
        self._pad_rows: np.ndarray | None = None
        if pad_obs_fn is not None and any(k in _OBS_KEYS for k in self.keys):
            last = dataset.observations[ends - 1]
            goals = dataset.goals[ends - 1] if dataset.goals is not None else [None] * len(ends)
            rows = np.stack([np.asarray(pad_obs_fn(o, g), dtype=np.float32)
                             for o, g in zip(last, goals)])
            if rows.shape != last.shape:
                raise ValueError(f"pad_obs_fn must return observation rows of shape "
                                 f"{last.shape[1:]}, got {rows.shape[1:]}")
            if "observations" in normalizers:
                rows = np.asarray(normalizers["observations"].normalize(rows), dtype=np.float32)
            self._pad_rows = rows  # (E, obs_dim)
        if returns_to_go or value:
            rewards = np.asarray(dataset.rewards, dtype=np.float64)
            if termination_penalty is not None:
                rewards = rewards + termination_penalty * np.asarray(dataset.terminals, dtype=bool)
            self._rtg = discounted_returns(rewards, ends, self.discount)
        self._episode_return = (np.add.reduceat(np.asarray(dataset.rewards, dtype=np.float64), starts)
                                if episode_return else None)
        self._offsets = np.arange(self.horizon, dtype=np.int64) * self.stride

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        return {k: v[0] for k, v in self.get_batch(np.array([i % len(self)])).items()}

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A batch of `batch_size` windows drawn uniformly with replacement."""
        return self.get_batch(rng.integers(0, len(self), size=batch_size))

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Windows ``indices: (B,)`` as a dict of arrays with a leading batch axis."""
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return {k: v.numpy() for k, v in _gather(self._tables(), idx, self).items()}

    def to(self, device: str | torch.device) -> DeviceWindows:
        """These windows with their arrays on ``device``: batches are gathered there."""
        return DeviceWindows(self, device)

    def _tables(self) -> dict[str, torch.Tensor | dict | None]:
        """The arrays :func:`_gather` reads, as CPU tensors sharing memory with the numpy ones."""
        if getattr(self, "_torch_tables", None) is None:
            t = lambda a: None if a is None else torch.from_numpy(a)
            self._torch_tables = {
                "starts": t(self.starts), "ends": t(self.ends), "offsets": t(self._offsets),
                "episode": t(np.asarray(self.episode_of_window, dtype=np.int64)),
                "arrays": {k: t(v) for k, v in self._arrays.items()}, "pad_rows": t(self._pad_rows),
                "rtg": t(getattr(self, "_rtg", None)), "episode_return": t(self._episode_return)}
        return self._torch_tables

    def __repr__(self) -> str:
        return (f"SequenceWindows(windows={len(self)}, horizon={self.horizon}, stride={self.stride}, "
                f"keys={self.keys}, pad={self.pad})")


def discounted_returns(rewards: np.ndarray, episode_ends: np.ndarray,
                       discount: float) -> np.ndarray:
    """``rtg[i] = sum_{k=i}^{end(i)-1} discount**(k-i) * rewards[k]`` within each episode.

    rewards: (N,); episode_ends: (E,) exclusive ends with episode_ends[-1] == N. Returns (N,)
    float64. Episodes are cut into blocks laid out as rows of a matrix; a backward pass over the
    columns solves every block at once, and a pass over block ranks carries each block's return
    into the block before it. That is O(block + longest / block) numpy calls whatever the number
    of episodes, and exact (no division by powers of the discount).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    n = len(rewards)
    ends = np.asarray(episode_ends, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    # Rows are padded to `block` columns: keep the table near a few times N when episodes are
    # tiny, and the rank loop short when one is long.
    block = int(min(128, (ends - starts).max(), max(8, 4 * n // len(ends))))
    episode = np.repeat(np.arange(len(ends)), ends - starts)
    pos = np.arange(n) - starts[episode]                    # step index inside the episode
    col = pos % block
    new_row = col == 0
    row = np.cumsum(new_row) - 1                            # one row per (episode, block)
    row_first = np.flatnonzero(new_row)
    row_len = np.diff(np.append(row_first, n))

    table = np.zeros((len(row_first), block + 1))
    table[row, col] = rewards
    for j in range(block - 1, -1, -1):                      # returns inside each block
        table[:, j] += discount * table[:, j + 1]

    # carry[r] = full return at the first step of the block after row r (0 if none); rows are
    # solved from the last block rank to the first.
    has_next = np.zeros(len(row_first), dtype=bool)
    has_next[:-1] = episode[row_first[1:]] == episode[row_first[:-1]]
    rank = pos[row_first] // block
    full_head = table[:, 0].copy()
    carry = np.zeros(len(row_first))
    chained = np.flatnonzero(has_next)
    chained = chained[np.argsort(rank[chained], kind="stable")]
    bounds = np.searchsorted(rank[chained], np.arange(int(rank.max()) + 1))
    bounds = np.append(bounds, len(chained))
    for r in range(int(rank.max()) - 1, -1, -1):
        rows_r = chained[bounds[r]:bounds[r + 1]]
        carry[rows_r] = full_head[rows_r + 1]
        full_head[rows_r] += discount ** row_len[rows_r] * carry[rows_r]
    return table[row, col] + discount ** (row_len[row] - col) * carry[row]


class DeviceWindows:
    """A :class:`SequenceWindows` with its arrays on a torch ``device``, from ``windows.to(device)``.

    ``sample(B)`` draws window indices with torch's generator on that device (``generator`` to use
    another) and gathers the batch there; ``get_batch(indices)`` takes a tensor of indices. Both
    return tensors on the device, equal to what the host windows return for the same indices.
    """

    def __init__(self, windows: SequenceWindows, device: str | torch.device):
        self.windows = windows
        self.device = torch.device(device)
        move = lambda v: (v if v is None else {k: x.to(self.device) for k, x in v.items()}
                          if isinstance(v, dict) else v.to(self.device))
        self.tables = {k: move(v) for k, v in windows._tables().items()}

    def __len__(self) -> int:
        return len(self.windows)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        idx = torch.randint(len(self.windows), (batch_size,), device=self.device, generator=generator)
        return self.get_batch(idx)

    def get_batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return _gather(self.tables, torch.as_tensor(indices, dtype=torch.int64, device=self.device), self.windows)

    def __repr__(self) -> str:
        return f"DeviceWindows({self.windows!r}, device={self.device})"


def _gather(t: Mapping, indices: torch.Tensor, w: SequenceWindows) -> dict[str, torch.Tensor]:
    """The batch of windows ``indices`` (see :class:`SequenceWindows`) from tables ``t`` on any device."""
    steps = t["starts"][indices, None] + t["offsets"]               # (B, H)
    ends = t["ends"][indices, None]
    real = steps < ends                                             # (B, H)
    rows = torch.minimum(steps, ends - 1)                           # past the end: last step
    out: dict[str, torch.Tensor] = {}
    for key in w.keys:
        x = t["arrays"][key][rows]                                  # (B, H, dim)
        if w.pad:
            if key in _ZERO_PAD_KEYS:
                x = x * real[..., None]
            elif key in _OBS_KEYS and t["pad_rows"] is not None:
                pad = t["pad_rows"][t["episode"][indices]][:, None, :]
                x = torch.where(real[..., None], x, pad)
        out[key] = x
    out["mask"] = real.float()
    if w.want_rtg:
        out["returns_to_go"] = (t["rtg"][rows] * real)[..., None].float()
    if w.want_value:
        out["value"] = t["rtg"][t["starts"][indices], None].float()
    if t["episode_return"] is not None:
        out["episode_return"] = t["episode_return"][t["episode"][indices], None].float()
    if w.want_goal:
        out["goal"] = t["arrays"]["goals"][t["starts"][indices]]
    return out
