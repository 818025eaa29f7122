"""Pictures of an evaluation: mazes with planned and executed paths, or the return histogram;
videos of an episode."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def hist_range(values, min_width: float) -> tuple[float, float]:
    """Histogram limits that cover ``values`` and are at least ``min_width`` wide, centred on them:
    near-equal returns get an axis in readable steps rather than one spanning 0.03 points."""
    lo, hi = float(np.min(values)), float(np.max(values))
    pad = max(0.0, min_width - (hi - lo)) / 2
    return lo - pad, hi + pad


def _maze_axes(report, ax) -> bool:
    """Draw the task's maze on ``ax``; False when the task has no maze."""
    try:
        from diffplan.envs import get_task, list_tasks
        from diffplan.envs.maze import draw_maze
    except ImportError:
        return False
    if report.task not in list_tasks():  # a Gymnasium env id
        return False
    card = get_task(report.task)
    if not getattr(card, "is_goal_env", False):
        return False
    draw_maze(ax, card)
    return True


def plot_report(report, path) -> Path:
    """Mazes: executed paths (solid) and each replan (dashed) over the walls, one panel per
    recorded episode. Other tasks: the distribution of normalized returns."""
    path = Path(path)
    n = len(report.paths)
    probe, probe_ax = plt.subplots()
    is_maze = n > 0 and _maze_axes(report, probe_ax)
    plt.close(probe)
    if is_maze:
        cols = min(n, 3)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
        for k, ax in enumerate(axes.flat):
            if k >= n:
                ax.axis("off")
                continue
            _maze_axes(report, ax)
            xy = report.paths[k][:, :2]
            for j, (step, plan) in enumerate(report.plans[k]):
                ax.plot(plan[:, 0], plan[:, 1], "--", lw=1, color="tab:orange", alpha=0.8,
                        label="plan" if j == 0 else None)
            ax.plot(xy[:, 0], xy[:, 1], "-", lw=2, color="tab:blue", label="executed")
            ax.plot(xy[0, 0], xy[0, 1], "o", color="tab:green", ms=8, label="start")
            r = report.returns[k]
            ax.set_title(f"episode {k}: return {r:.0f}", fontsize=10)
            if k == 0:
                ax.legend(loc="lower right", fontsize=7)
        optimal = report.extra.get("optimal_normalized_mean")
        vs_optimal = "" if optimal is None else (
            f" (near-optimal controller = 100: {optimal:.1f} ± {report.extra['optimal_normalized_stderr']:.1f})")
        fig.suptitle(f"{report.policy} on {report.task}: normalized {report.normalized_mean:.1f} "
                     f"± {report.normalized_stderr:.1f} over {report.episodes} episodes{vs_optimal}")
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
        r = np.asarray(report.returns)
        lo, hi = report.ref_min_score, report.ref_max_score
        norm = 100 * (r - lo) / (hi - lo) if lo is not None and hi is not None else r
        min_width = 10.0 if lo is not None else max(1.0, 0.05 * abs(float(norm.mean())))
        ax.hist(norm, bins=min(20, max(5, len(r) // 3)), range=hist_range(norm, min_width), color="tab:blue")
        ax.axvline(norm.mean(), color="k", ls="--", label=f"mean {norm.mean():.1f}")
        ax.set_xlabel("normalized return" if lo is not None else "return")
        ax.set_ylabel("episodes")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts, never 0.25 of an episode
        ax.legend()
        ax.set_title(f"{report.policy} on {report.task}\n{report.normalized_mean:.1f} "  # two lines: long
                     f"± {report.normalized_stderr:.1f} over {report.episodes} episodes")  # names fit
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def animate_episode(report, path, episode: int = 0, every: int = 4) -> Path:
    """A GIF of one recorded maze episode: the point, its trail and the plan in force."""
    import imageio.v2 as imageio

    path = Path(path)
    xy = report.paths[episode][:, :2]
    plans = report.plans[episode]
    frames = []
    fig, ax = plt.subplots(figsize=(4, 4))
    for t in range(0, len(xy), every):
        ax.clear()
        if not _maze_axes(report, ax):
            ax.set_aspect("equal")
        current = [p for s, p in plans if s <= t]
        if current:
            ax.plot(current[-1][:, 0], current[-1][:, 1], "--", color="tab:orange", lw=1)
        ax.plot(xy[: t + 1, 0], xy[: t + 1, 1], "-", color="tab:blue", lw=2)
        ax.plot(xy[t, 0], xy[t, 1], "o", color="tab:red", ms=8)
        ax.set_title(f"{report.task}  step {t}")
        fig.canvas.draw()
        frames.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    imageio.mimsave(path, frames, duration=50, loop=0)  # ms per frame
    return path


def write_video(frames, path, fps: float = 30.0) -> Path:
    """Rendered RGB frames as ``path``.mp4, or ``path``.gif where imageio-ffmpeg is not installed."""
    import imageio.v2 as imageio

    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        path = Path(path).with_suffix(".gif")
        imageio.mimsave(path, frames, duration=1000 / fps, loop=0)
        return path
    path = Path(path).with_suffix(".mp4")
    imageio.mimsave(path, frames, fps=fps, macro_block_size=8)
    return path
