"""PointMaze suite: cards, geometry, waypoint expert, dataset recipe, eval protocol, caching."""

import gymnasium as gym
import numpy as np
import pytest
from diffplan.envs import (
    TaskCard,
    UnknownTaskError,
    get_task,
    list_tasks,
    register_task,
)
from diffplan.envs import tasks as registry
from diffplan.envs.maze import (
    WaypointExpert,
    cell_to_xy,
    draw_maze,
    get_maze,
    goal_pad_obs,
    run_episodes,
    xy_to_cell,
)

from diffplan.data import SequenceWindows, load

MAZES = ["pointmaze-umaze", "pointmaze-medium", "pointmaze-large"]


@pytest.fixture(autouse=True)
def minari_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return tmp_path / "minari"


@pytest.mark.parametrize("name", MAZES)
def test_cards_carry_the_eval_protocol_and_measured_refs(name):
    card = get_task(name)
    assert isinstance(card, TaskCard) and card.is_goal_env and card.family == "maze"
    assert card.dataset_id == f"diffplan/{name}-v0"
    assert card.ref_min_score < card.ref_max_score and card.d4rl_ref_max_score is not None
    env = card.make_env()
    try:
        assert env.spec.max_episode_steps == card.episode_steps
        assert env.unwrapped.continuing_task and not env.unwrapped.reset_target
        obs, _ = env.reset(seed=1)
        goal_cell = tuple(get_maze(card).xy_to_cell(obs["desired_goal"]))
        assert goal_cell == tuple(card.extras["goal_cell"])
    finally:
        env.close()


def test_eval_env_spec_rebuilds_the_goal_wrapper():
    card = get_task("pointmaze-umaze")
    env = gym.make(card.eval_env_spec())
    obs, _ = env.reset(seed=0)
    assert tuple(get_maze(card).xy_to_cell(obs["desired_goal"])) == (1, 1)
    env.close()


def test_unknown_task_lists_known_ones():
    with pytest.raises(UnknownTaskError, match="unknown task 'pointmaze-huge'.*pointmaze-umaze"):
        get_task("pointmaze-huge")
    # a version that is not registered here names the version, not just the name
    with pytest.raises(UnknownTaskError, match="'pointmaze-umaze' has no version 3 here"):
        get_task("pointmaze-umaze-v3")
    assert set(MAZES) <= set(list_tasks())


@pytest.mark.parametrize("name", MAZES)
def test_geometry_matches_the_env(name):
    card = get_task(name)
    env = gym.make(card.env_id)
    maze = env.unwrapped.maze
    for row, col in get_maze(card).free_cells:
        np.testing.assert_allclose(cell_to_xy(card, row, col),
                                   maze.cell_rowcol_to_xy(np.array([row, col])))
        xy = maze.cell_rowcol_to_xy(np.array([row, col])) + np.array([0.3, -0.3])
        np.testing.assert_array_equal(xy_to_cell(card, xy), maze.cell_xy_to_rowcol(xy))
    env.close()


def test_shortest_path_in_umaze_goes_around_the_wall():
    path = get_maze("pointmaze-umaze").shortest_path((3, 1), (1, 1))
    assert path == [(3, 1), (3, 2), (3, 3), (2, 3), (1, 3), (1, 2), (1, 1)]


def test_expert_reaches_the_goal_in_umaze_eval_episodes():
    card = get_task("pointmaze-umaze")
    result = run_episodes(card, card.make_expert(), episodes=20, seed=100)
    assert (result["first_hit"] >= 0).mean() >= 0.95
    # and it stays there: the mean return is near the card's reference
    assert result["returns"].mean() > 0.8 * card.ref_max_score


def test_expert_is_batched_like_a_vector_env():
    card = get_task("pointmaze-medium")
    maze = get_maze(card)
    rng = np.random.default_rng(0)
    cells = maze.free_cells[rng.integers(0, len(maze.free_cells), size=6)]
    state = np.c_[maze.cell_to_xy(cells[:, 0], cells[:, 1]), rng.normal(size=(6, 2))]
    goal = maze.cell_to_xy(6, 6) + rng.uniform(-0.2, 0.2, size=(6, 2))
    batched = WaypointExpert(maze, jitter=0.0)
    actions = batched.act({"observation": state, "desired_goal": goal})
    assert actions.shape == (6, 2) and np.abs(actions).max() <= 1
    for i in range(6):
        single = WaypointExpert(maze, jitter=0.0).act(
            {"observation": state[i], "desired_goal": goal[i]})
        assert single.shape == (2,)
        np.testing.assert_allclose(actions[i], single)
    batched.reset(mask=np.array([True, False, False, False, False, False]))
    assert np.isnan(batched._goal[0]).all() and not np.isnan(batched._goal[1]).any()
    assert batched.action_space.contains(actions[0].astype(np.float32))
    with pytest.raises(ValueError, match="dict observation"):
        batched.act(state)


def test_dataset_recipe_is_deterministic_and_split_at_goals():
    card = get_task("pointmaze-umaze")
    a = card.make_dataset(progress=False, steps=4000)
    b = card.make_dataset(progress=False, steps=4000)
    for key in ("observations", "actions", "rewards", "timeouts", "goals", "next_observations"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    c = card.make_dataset(progress=False, steps=4000, seed=1)
    assert not np.array_equal(a.actions, c.actions)

    assert a.task == card.name and a.env_id == card.env_id and a.num_episodes > 20
    assert a.ref_max_score == card.ref_max_score
    ends = a.episode_ends[:-1]
    # every episode but the cut last one ends on the step that reaches its goal ...
    assert (a.rewards[ends - 1] == 1).all()
    np.testing.assert_array_less(
        np.linalg.norm(a.next_observations[ends - 1, :2] - a.goals[ends - 1], axis=1), 0.45)
    # ... nothing else is rewarded, the goal is constant inside an episode and new after it
    assert a.rewards.sum() == len(ends)
    for start, end in zip(a.episode_starts, a.episode_ends):
        assert (a.goals[start:end] == a.goals[start]).all()
    assert (a.goals[ends] != a.goals[ends - 1]).any(axis=1).all()
    # a continuing run: next observations are the following observations, across episodes too
    np.testing.assert_array_equal(a.next_observations[:-1], a.observations[1:])


def test_goal_padding_windows_on_maze_data():
    data = get_task("pointmaze-umaze").make_dataset(progress=False, steps=3000)
    w = SequenceWindows(data, horizon=128, pad=True, pad_obs_fn=goal_pad_obs, goal=True)
    b = w.get_batch(np.arange(0, len(w), 7))
    pad = b["mask"] == 0
    assert pad.any()
    goals = np.broadcast_to(b["goal"][:, None], b["observations"][..., :2].shape)
    np.testing.assert_array_equal(b["observations"][..., :2][pad], goals[pad])
    assert (b["observations"][..., 2:][pad] == 0).all()


def test_load_makes_a_task_dataset_once_and_caches_it(monkeypatch, minari_root):
    tiny = get_task("pointmaze-umaze").replace(name="pointmaze-umaze-tiny", dataset_steps=1500)
    monkeypatch.setitem(registry._REGISTRY, tiny.name, tiny)
    assert not tiny.dataset_is_made()
    made = load(tiny.name, progress=False)
    assert tiny.dataset_is_made()
    assert (minari_root / "diffplan" / "pointmaze-umaze-tiny-v0" / "data").is_dir()
    calls = []
    monkeypatch.setitem(registry._REGISTRY, tiny.name,
                        tiny.replace(build_dataset=lambda *a: calls.append(a)))
    cached = load(tiny.name, progress=False)
    assert calls == []  # read from the cache, not made again
    for key in ("observations", "actions", "goals", "timeouts", "next_observations"):
        np.testing.assert_array_equal(getattr(made, key), getattr(cached, key), err_msg=key)
    assert cached.task == tiny.name and cached.ref_min_score == tiny.ref_min_score


def test_register_task_refuses_duplicates():
    card = get_task("pointmaze-umaze")
    with pytest.raises(ValueError, match="already registered"):
        register_task(card.replace())


def test_draw_maze_draws_walls_and_goal():
    from matplotlib.figure import Figure  # no pyplot: no GUI backend needed

    ax = Figure().add_subplot()
    draw_maze(ax, "pointmaze-large")
    walls = int(get_maze("pointmaze-large").maze_map.sum())
    assert len(ax.patches) == walls + 1  # walls plus the floor
    assert ax.get_xlim() == (-6.0, 6.0) and ax.get_ylim() == (-4.5, 4.5)


def _load_in_subprocess(root, name, steps, queue):
    import os

    os.environ["MINARI_DATASETS_PATH"] = str(root)
    base = get_task("pointmaze-umaze")

    def counted_build(*args):
        with open(root / "builds.txt", "a") as log:
            log.write("built\n")
        return base.build_dataset(*args)

    card = base.replace(name=name, dataset_steps=steps, build_dataset=counted_build)
    registry._REGISTRY[name] = card
    queue.put(len(card.load_dataset(progress=False)))


def test_concurrent_loads_make_the_dataset_once(minari_root):
    """Two processes (e.g. DDP ranks) asking for an unmade dataset: one makes it, one reads it."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_subprocess,
                         args=(minari_root, "pointmaze-umaze-race", 1000, queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert [queue.get(), queue.get()] == [1000, 1000]
    assert (minari_root / "builds.txt").read_text() == "built\n"
    import minari

    assert list(minari.list_local_datasets()) == ["diffplan/pointmaze-umaze-race-v0"]
