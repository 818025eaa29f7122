"""Dataset I/O: Minari (both directions, and Minari's own writer), D4RL HDF5, npz, load()."""

import json

import h5py
import minari
import numpy as np
import pytest
from gymnasium import spaces
from minari.data_collector import EpisodeBuffer

from diffplan.data import (
    DatasetError,
    OfflineDataset,
    from_d4rl_hdf5,
    from_minari,
    from_npz,
    load,
    minari_dataset_exists,
)

KEYS = ("observations", "actions", "rewards", "terminals", "timeouts", "goals",
        "next_observations")


@pytest.fixture(autouse=True)
def minari_root(tmp_path, monkeypatch):
    """Every test gets its own Minari folder, never the user's cache."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def goal_dataset(n=400, seed=0, **meta):
    """A continuing run of random steps, cut into episodes of random length, with goals and
    consistent next observations (next_observations[i] == observations[i + 1])."""
    rng = np.random.default_rng(seed)
    states = rng.normal(size=(n + 1, 4)).astype(np.float32)
    timeouts = np.zeros(n, bool)
    timeouts[np.sort(rng.choice(n - 1, size=n // 30, replace=False))] = True
    timeouts[-1] = True
    episode = np.concatenate([[0], np.cumsum(timeouts)[:-1]])
    goals = rng.normal(size=(int(episode.max()) + 1, 2))[episode]
    meta = {"env_id": "PointMaze_UMaze-v3", "env_kwargs": {"continuing_task": True},
            "ref_min_score": 1.5, "ref_max_score": 99.0, "source": "test", "task": None, **meta}
    return OfflineDataset(observations=states[:-1], actions=rng.uniform(-1, 1, size=(n, 2)),
                          rewards=rng.integers(0, 2, size=n), terminals=np.zeros(n, bool),
                          timeouts=timeouts, goals=goals, next_observations=states[1:], **meta)


def assert_same(a, b, keys=KEYS):
    for key in keys:
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None) == (y is None), key
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=key)


def test_minari_round_trip_through_minari_load_dataset():
    data = goal_dataset()
    data.to_minari("diffplan/roundtrip-v0")
    # Minari itself reads what diffplan wrote ...
    ds = minari.load_dataset("diffplan/roundtrip-v0")
    assert ds.total_episodes == data.num_episodes and ds.total_steps == len(data)
    first = next(ds.iterate_episodes())
    np.testing.assert_array_equal(first.observations["observation"][:-1],
                                  data.observations[:data.episode_ends[0]])
    assert minari.get_normalized_score(ds, np.array([99.0]))[0] == pytest.approx(1.0)
    # ... and diffplan reads it back unchanged, metadata included.
    back = from_minari("diffplan/roundtrip-v0")
    assert_same(data, back)
    assert back.metadata() == data.metadata()
    assert minari_dataset_exists("diffplan/roundtrip-v0", complete_only=True)


def test_minari_round_trip_without_goals_or_next_observations():
    data = goal_dataset().replace(goals=None, next_observations=None, env_id="", env_kwargs={})
    data.to_minari("diffplan/plain-v0")
    back = from_minari(minari.load_dataset("diffplan/plain-v0"))
    assert_same(data, back)


def test_minari_refuses_to_overwrite_unless_forced():
    data = goal_dataset()
    data.to_minari("diffplan/twice-v0")
    with pytest.raises(DatasetError, match="already exists"):
        data.to_minari("diffplan/twice-v0")
    data.to_minari("diffplan/twice-v0", force=True)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Minari nags about optional metadata
def test_dataset_written_by_minaris_own_api_is_read():
    rng = np.random.default_rng(1)
    buffers = []
    for length in (5, 9, 3):
        obs = rng.normal(size=(length + 1, 4))
        goal = np.repeat(rng.normal(size=(1, 2)), length + 1, axis=0)
        buffers.append(EpisodeBuffer(
            observations={"observation": obs, "achieved_goal": obs[:, :2], "desired_goal": goal},
            actions=rng.uniform(-1, 1, size=(length, 2)), rewards=rng.normal(size=length),
            terminations=np.zeros(length, bool),
            # Minari allows an episode that ends with neither flag; diffplan must still cut there.
            truncations=np.r_[np.zeros(length - 1, bool), length != 9]))
    box = lambda n: spaces.Box(-np.inf, np.inf, shape=(n,), dtype=np.float64)
    obs_space = spaces.Dict({"observation": box(4), "achieved_goal": box(2),
                             "desired_goal": box(2)})
    minari.create_dataset_from_buffers(
        "test/native-v0", buffers, observation_space=obs_space,
        action_space=spaces.Box(-1, 1, shape=(2,)), algorithm_name="test", author="test",
        author_email="test@example.com", code_permalink="none", description="native")
    data = from_minari("test/native-v0")
    assert len(data) == 17 and data.num_episodes == 3
    np.testing.assert_array_equal(data.episode_ends, [5, 14, 17])
    np.testing.assert_array_equal(data.observations[:5],
                                  buffers[0].observations["observation"][:-1].astype(np.float32))
    np.testing.assert_array_equal(data.next_observations[4],
                                  buffers[0].observations["observation"][-1].astype(np.float32))
    np.testing.assert_array_equal(data.goals[5:14],
                                  buffers[1].observations["desired_goal"][:-1].astype(np.float32))
    assert data.source == "minari:test/native-v0" and data.ref_min_score is None


def test_fast_hdf5_reader_matches_minaris_episode_iterator():
    data = goal_dataset(n=300)
    data.to_minari("diffplan/fast-v0")
    ds = minari.load_dataset("diffplan/fast-v0")
    slow = np.concatenate([ep.observations["observation"][:-1] for ep in ds.iterate_episodes()])
    np.testing.assert_array_equal(from_minari(ds).observations, slow)


def test_missing_minari_id_says_it_cannot_download(minari_root):
    with pytest.raises(DatasetError, match="cannot download") as err:
        from_minari("D4RL/pointmaze/umaze-v2")
    assert "diffplan data make" in str(err.value) and str(minari_root) in str(err.value)


def test_inconsistent_next_observations_cannot_go_to_minari():
    data = goal_dataset()
    nxt = data.next_observations.copy()
    nxt[2] += 1.0
    with pytest.raises(DatasetError, match=r"next_observations\[2\]"):
        data.replace(next_observations=nxt).to_minari("diffplan/bad-v0")
    assert not minari_dataset_exists("diffplan/bad-v0")


@pytest.mark.parametrize("with_timeouts", [True, False])
def test_d4rl_hdf5_with_and_without_timeouts(tmp_path, with_timeouts):
    data = goal_dataset()
    path = tmp_path / "maze2d.hdf5"
    with h5py.File(path, "w") as f:  # D4RL's layout, written by hand
        for key in ("observations", "actions", "rewards", "terminals"):
            f.create_dataset(key, data=getattr(data, key))
        if with_timeouts:
            f.create_dataset("timeouts", data=data.timeouts)
        f.create_dataset("infos/goal", data=data.goals)
    back = from_d4rl_hdf5(path)
    assert_same(data, back, ("observations", "actions", "rewards", "terminals", "goals"))
    if with_timeouts:
        np.testing.assert_array_equal(back.episode_ends, data.episode_ends)
    else:
        assert not back.timeouts.any() and back.num_episodes == 1
    assert back.next_observations is None and back.source == "d4rl-hdf5:maze2d.hdf5"


def test_d4rl_hdf5_round_trip_keeps_metadata(tmp_path):
    data = goal_dataset(task="pointmaze-umaze")
    data.to_d4rl_hdf5(tmp_path / "d.hdf5")
    back = from_d4rl_hdf5(tmp_path / "d.hdf5")
    assert_same(data, back)
    assert back.metadata() == data.metadata()


def test_d4rl_hdf5_missing_actions_is_named(tmp_path):
    path = tmp_path / "bad.hdf5"
    with h5py.File(path, "w") as f:
        for key in ("observations", "rewards", "terminals"):
            f.create_dataset(key, data=np.zeros((4, 2) if key == "observations" else 4))
    with pytest.raises(DatasetError, match="missing the required key 'actions'"):
        from_d4rl_hdf5(path)


def test_d4rl_hdf5_mismatched_lengths_and_nans_are_reported(tmp_path):
    path = tmp_path / "bad.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=np.zeros((5, 3)))
        f.create_dataset("actions", data=np.zeros((4, 2)))
        f.create_dataset("rewards", data=np.zeros(5))
        f.create_dataset("terminals", data=np.zeros(5, bool))
    with pytest.raises(DatasetError, match="'actions' has 4 steps but 'observations' has 5"):
        from_d4rl_hdf5(path)
    obs = np.zeros((5, 3))
    obs[3, 2] = np.nan
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=obs)
        f.create_dataset("actions", data=np.zeros((5, 2)))
        f.create_dataset("rewards", data=np.zeros(5))
        f.create_dataset("terminals", data=np.zeros(5, bool))
    with pytest.raises(DatasetError, match="'observations'.*first bad index 3"):
        from_d4rl_hdf5(path)


def test_corrupt_files_give_clear_errors(tmp_path):
    bad = tmp_path / "corrupt.hdf5"
    bad.write_bytes(b"this is not an hdf5 file" * 10)
    with pytest.raises(DatasetError, match="corrupt or not an HDF5 file"):
        from_d4rl_hdf5(bad)
    bad_npz = tmp_path / "corrupt.npz"
    bad_npz.write_bytes(b"nope")
    with pytest.raises(DatasetError, match="could not read"):
        from_npz(bad_npz)
    with pytest.raises(DatasetError, match="no such HDF5 file"):
        from_d4rl_hdf5(tmp_path / "absent.hdf5")


def test_npz_round_trip_without_pickle(tmp_path):
    data = goal_dataset(task="x")
    data.to_npz(tmp_path / "d.npz")
    with np.load(tmp_path / "d.npz", allow_pickle=False) as npz:
        assert "metadata_json" in npz.files
    back = from_npz(tmp_path / "d.npz")
    assert_same(data, back)
    assert back.metadata() == data.metadata()


def test_load_resolves_minari_ids_and_paths(tmp_path):
    data = goal_dataset()
    data.to_minari("diffplan/byid-v0")
    data.to_npz(tmp_path / "d.npz")
    data.to_d4rl_hdf5(tmp_path / "d.hdf5")
    for name in ("diffplan/byid-v0", tmp_path / "d.npz", str(tmp_path / "d.hdf5")):
        assert_same(data, load(name))


def test_load_unknown_name_lists_known_tasks():
    with pytest.raises(DatasetError, match="unknown dataset 'no-such-task'.*pointmaze-umaze"):
        load("no-such-task")
    with pytest.raises(DatasetError, match="no such file"):
        load("missing.npz")


@pytest.mark.parametrize("damage, message", [
    ("total_episodes", "is corrupt: metadata.json says 5 episodes and 400 steps, but "
                       "main_data.hdf5 holds 14 episodes and 400 steps"),
    ("total_steps", "is corrupt: metadata.json says 14 episodes and 1,000,000 steps"),
    ("complete", "is incomplete: its writer did not finish"),
    ("truncate", "is corrupt: .*main_data.hdf5 is unreadable"),
    ("delete", "is corrupt: .*main_data.hdf5 is missing"),
])
def test_minari_metadata_is_checked_against_the_file(minari_root, damage, message):
    goal_dataset(task="some-task").to_minari("diffplan/damaged-v0")
    folder = minari_root / "diffplan" / "damaged-v0" / "data"
    meta = json.loads((folder / "metadata.json").read_text())
    h5 = folder / "main_data.hdf5"
    if damage in ("total_episodes", "total_steps"):
        meta[damage] = {"total_episodes": 5, "total_steps": 1_000_000}[damage]
    elif damage == "complete":
        meta["diffplan"]["complete"] = False
    elif damage == "truncate":
        h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
    else:
        h5.unlink()
    (folder / "metadata.json").write_text(json.dumps(meta))
    fix = "; heal it with `diffplan data make some-task --force`"
    for source in ("diffplan/damaged-v0", folder):
        with pytest.raises(DatasetError, match=f"'diffplan/damaged-v0' {message}.*{fix}"):
            load(source)
    assert not minari_dataset_exists("diffplan/damaged-v0", complete_only=True)


@pytest.mark.parametrize("fmt", ["npz", "hdf5"])
def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch, fmt):
    from diffplan.data import from_npz

    old, new = goal_dataset(seed=0), goal_dataset(seed=1)
    path = tmp_path / f"d.{fmt}"
    write = (lambda d: d.to_npz(path)) if fmt == "npz" else (lambda d: d.to_d4rl_hdf5(path))
    read = from_npz if fmt == "npz" else from_d4rl_hdf5
    write(old)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if fmt == "npz":
        monkeypatch.setattr(np, "savez", disk_full)
    else:
        monkeypatch.setattr(h5py.Group, "create_dataset", disk_full)
    with pytest.raises(OSError, match="No space"):
        write(new)
    monkeypatch.undo()
    assert_same(old, read(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    write(new)
    assert_same(new, read(path))
