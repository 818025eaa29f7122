"""Locomotion dataset recipes: determinism, episode boundaries, timeouts, D4RL HDF5 round trip.

Small step counts and tiny stand-in actors written to a temporary behavior folder, so these tests
do not depend on which snapshots are shipped.
"""

import numpy as np
import pytest
import torch

from diffplan.envs import locomotion as L
from diffplan.envs.behavior import ActorMeta, TanhGaussianActor


def _write_snapshots(root, family="hopper", steps_scores=((10_000, 1.0), (20_000, 20.0),
                                                         (30_000, 45.0), (40_000, 70.0)), folder=None):
    env_id = L.FAMILIES[family]
    import gymnasium as gym

    env = gym.make(env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    for i, (step, score) in enumerate(steps_scores):
        torch.manual_seed(i)
        meta = ActorMeta(obs_dim=obs_dim, act_dim=act_dim, hidden_sizes=[16, 16],
                         action_low=[-1.0] * act_dim, action_high=[1.0] * act_dim, env_id=env_id,
                         train_step=step, eval_return_mean=score * 30, d4rl_score=score)
        TanhGaussianActor(obs_dim, act_dim, [16, 16], meta.action_low, meta.action_high,
                          meta=meta).save(root / (folder or family) / f"step-{step}")
    return root


@pytest.fixture()
def root(tmp_path):
    return _write_snapshots(tmp_path)


def test_snapshot_choice(root):
    assert L.medium_snapshot("hopper", root).step == 30_000  # 45 is closest to 44
    assert L.expert_snapshot("hopper", root).step == 40_000


def test_replay_recipe_weights(root):
    segs = L.recipe("hopper", "medium-replay", root=root)
    # [0,10k) random, [10k,20k) step-10000, [20k,30k) step-20000; ends at the medium step
    assert [s.label for s in segs] == ["random", "replay:step-10000", "replay:step-20000"]
    assert [s.steps for s in segs] == [10_000, 10_000, 10_000]
    small = L.recipe("hopper", "medium-replay", steps=3000, root=root)
    assert sum(s.steps for s in small) == 3000
    me = L.recipe("hopper", "medium-expert", steps=1000, root=root)
    assert [s.label for s in me] == ["medium:step-30000", "expert:step-40000"]
    # the medium part of medium-expert is the medium dataset itself
    assert me[0].seed == L.recipe("hopper", "medium", root=root)[0].seed


@pytest.mark.parametrize("kind", ["medium", "medium-replay", "medium-expert"])
def test_regenerate_identical(root, kind):
    a, info_a = L.generate("hopper", kind, steps=1500, num_envs=4, progress=False, root=root)
    b, info_b = L.generate("hopper", kind, steps=1500, num_envs=4, progress=False, root=root)
    assert info_a == info_b
    for k in L.KEYS:
        assert a[k].shape[0] == 1500
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    c, _ = L.generate("hopper", kind, steps=1500, seed=1, num_envs=4, progress=False, root=root)
    assert not np.array_equal(a["actions"], c["actions"])


def test_episode_boundaries_and_timeouts(tmp_path):
    # a near-deterministic actor on HalfCheetah never terminates: every episode is 1000 steps
    root = _write_snapshots(tmp_path, "halfcheetah", ((10_000, 40.0),))
    d, _ = L.generate("halfcheetah", "medium", steps=2500, num_envs=2, progress=False, root=root)
    ends = np.flatnonzero(d["terminals"] | d["timeouts"])
    assert list(ends) == [999, 1999, 2499]
    assert not d["terminals"].any() and d["timeouts"][ends].all()
    # within an episode the next observation is the following observation
    ok = np.ones(2500, bool)
    ok[ends] = False
    np.testing.assert_array_equal(d["next_observations"][:-1][ok[:-1]], d["observations"][1:][ok[:-1]])


def test_terminals_from_env(root):
    d, _ = L.generate("hopper", "medium", steps=3000, num_envs=3, progress=False, root=root)
    # random-ish tiny actors make Hopper fall: episodes end on env terminations, well before 1000
    assert d["terminals"].sum() > 3
    assert not (d["terminals"] & d["timeouts"]).any()
    ends = np.flatnonzero(d["terminals"] | d["timeouts"])
    assert ends[-1] == 2999 and np.diff(np.r_[-1, ends]).max() <= 1000
    # a terminal step's next observation is the state the env ended in (not a reset)
    i = np.flatnonzero(d["terminals"])[0]
    assert not np.allclose(d["next_observations"][i], d["observations"][i + 1])


def test_d4rl_hdf5_roundtrip(root, tmp_path):
    data = pytest.importorskip("diffplan.data", reason="diffplan.data is not importable")
    if not hasattr(data, "from_d4rl_hdf5"):
        pytest.skip("diffplan.data.from_d4rl_hdf5 does not exist yet")
    h5py = pytest.importorskip("h5py")
    d, _ = L.generate("hopper", "medium-replay", steps=2000, num_envs=3, progress=False, root=root)
    path = tmp_path / "hopper-medium-replay.hdf5"
    with h5py.File(path, "w") as f:  # D4RL's layout, written by hand
        for k in L.KEYS:
            f.create_dataset(k, data=d[k])
    ds = data.from_d4rl_hdf5(path)
    for k in L.KEYS:
        np.testing.assert_array_equal(np.asarray(getattr(ds, k)), d[k], err_msg=k)
    ends = np.flatnonzero(d["terminals"] | d["timeouts"]) + 1
    np.testing.assert_array_equal(np.asarray(ds.episode_ends), ends)


def test_make_dataset_to_hdf5_and_back(root, tmp_path):
    data = pytest.importorskip("diffplan.data", reason="diffplan.data is not importable")
    if not hasattr(data, "to_d4rl_hdf5"):
        pytest.skip("diffplan.data.to_d4rl_hdf5 does not exist yet")
    ds = L.make_dataset("hopper", "medium-expert", steps=1200, num_envs=2, progress=False,
                        root=root)
    assert ds.task == "hopper-medium-expert" and ds.env_id == "Hopper-v5"
    assert ds.ref_max_score == pytest.approx(3234.3)
    data.to_d4rl_hdf5(ds, tmp_path / "me.hdf5")
    back = data.from_d4rl_hdf5(tmp_path / "me.hdf5")
    for k in L.KEYS:
        np.testing.assert_array_equal(getattr(back, k), getattr(ds, k), err_msg=k)
    assert back.task == ds.task and back.ref_min_score == ds.ref_min_score


def test_prune_keeps_medium_expert_and_replay_spread(tmp_path):
    steps = [(10_000 * (i + 1), float(s)) for i, s in enumerate(
        [1, 5, 10, 20, 30, 35, 44, 50, 60, 75, 80, 70])]
    root = _write_snapshots(tmp_path / "b", steps_scores=steps)
    kept, moved = L.prune_snapshots("hopper", keep=5, root=root, dest=tmp_path / "pruned")
    assert len(kept) == 5 and len(moved) == 7
    assert "step-70000" in kept and "step-110000" in kept  # medium (44) and expert (80)
    assert "step-10000" in kept
    assert sorted(p.name for p in (tmp_path / "pruned").iterdir()) == sorted(moved)
    assert L.medium_snapshot("hopper", root).step == 70_000
    assert L.expert_snapshot("hopper", root).step == 110_000


# ---------------------------------------------------------------------------------------------
# Dataset versions (issue #23): v1 behaviors live beside v0's; both stay loadable
# ---------------------------------------------------------------------------------------------


def test_v1_snapshot_choice_and_replay_owners(root):
    # v1's medium is the first snapshot at or past the medium level (44), not the closest one
    assert L.medium_snapshot("hopper", root, version=1).step == 30_000
    _write_snapshots(root, "walker2d", ((10_000, 5.0), (20_000, 70.0), (30_000, 63.0)))
    assert L.medium_snapshot("walker2d", root, version=0).step == 30_000  # closest to 62
    assert L.medium_snapshot("walker2d", root, version=1).step == 20_000  # first past 62
    with pytest.raises(FileNotFoundError, match="below D4RL's expert level"):
        L.expert_snapshot("walker2d", root, version=1)  # 70 < 100: no v1 medium-expert
    # v1 rolls each stretch out by the snapshot that ends it; v0 by the one that starts it
    v0 = L.recipe("hopper", "medium-replay", root=root, version=0)
    v1 = L.recipe("hopper", "medium-replay", root=root, version=1)
    assert [s.label for s in v0] == ["random", "replay:step-10000", "replay:step-20000"]
    assert [s.label for s in v1] == ["random", "replay:step-20000", "replay:step-30000"]
    assert [s.steps for s in v1] == [s.steps for s in v0]
    a, _ = L.generate("hopper", "medium-replay", steps=1200, num_envs=4, progress=False, root=root, version=1)
    b, _ = L.generate("hopper", "medium-replay", steps=1200, num_envs=4, progress=False, root=root, version=1)
    for k in L.KEYS:  # regenerating v1 gives identical arrays
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_v1_expert_pin_names_its_run_folder(tmp_path, monkeypatch):
    """An expert pin is (version, run folder, snapshot): it may name another run of the family
    (halfcheetah's TQC run beside its SAC one) or a v0 snapshot, and snapshot_ref says which."""
    v0, v1 = tmp_path / "behavior", tmp_path / "behavior-v1"
    _write_snapshots(v0, "hopper", ((10_000, 50.0), (20_000, 109.0)))
    _write_snapshots(v1, "hopper", ((10_000, 10.0), (20_000, 50.0)))
    _write_snapshots(v1, "hopper", ((50_000, 95.0),), folder="hopper-tqc")
    monkeypatch.setattr(L, "behavior_dir", lambda version=0: v0 if version == 0 else v1)
    monkeypatch.setitem(L.PINNED_V1, "hopper", {"medium": "step-20000", "expert": (1, "hopper-tqc", "step-50000")})
    exp = L.expert_snapshot("hopper", version=1)
    assert (exp.step, exp.score) == (50_000, 95.0)
    assert L.snapshot_ref(exp) == "behavior-v1/hopper-tqc/step-50000"
    monkeypatch.setitem(L.PINNED_V1, "hopper", {"medium": "step-20000", "expert": (0, "hopper", "step-20000")})
    assert L.snapshot_ref(L.expert_snapshot("hopper", version=1)) == "behavior/hopper/step-20000"
    assert L.medium_snapshot("hopper", version=1).step == 20_000
    monkeypatch.setitem(L.PINNED_V1, "hopper", {"medium": "step-20000", "expert": (1, "hopper-tqc", "step-90000")})
    with pytest.raises(FileNotFoundError, match="step-90000"):
        L.expert_snapshot("hopper", version=1)


def test_dataset_stats_count_episodes_and_normalize():
    from diffplan.data import OfflineDataset

    lo, hi = L.D4RL_REF["hopper"]
    n = 5
    d = OfflineDataset(observations=np.zeros((n, 11), np.float32), actions=np.zeros((n, 3), np.float32),
                       rewards=np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32),
                       terminals=np.array([0, 1, 0, 0, 0], bool), timeouts=np.array([0, 0, 0, 0, 1], bool),
                       ref_min_score=lo, ref_max_score=hi)
    s = L.dataset_stats(d)
    norm = [100 * (3.0 - lo) / (hi - lo), 100 * (12.0 - lo) / (hi - lo)]
    assert (s["steps"], s["episodes"]) == (5, 2)
    assert s["mean"] == pytest.approx(np.mean(norm), abs=0.01)
    assert (s["min"], s["max"]) == (pytest.approx(norm[0], abs=0.01), pytest.approx(norm[1], abs=0.01))


def test_v0_and_v1_cards_both_load(tmp_path, monkeypatch):
    """The shipped cards: v0 keeps its name and Minari id; v1 has its own; both make and load."""
    from diffplan.envs.tasks import get_task

    v0, v1 = get_task("hopper-medium-replay"), get_task("hopper-medium-replay-v1")
    assert (v0.dataset_id, v1.dataset_id) == ("diffplan/hopper-medium-replay-v0", "diffplan/hopper-medium-replay-v1")
    assert v1.extras["d4rl_stats"]["steps"] == 400_000 and v1.dataset_version == 1
    assert v0.extras["medium_snapshot"] == L.PINNED["hopper"]["medium"]
    assert v1.extras["medium_snapshot"] == L.PINNED_V1["hopper"]["medium"]
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    for card in (v0, v1):
        small = card.replace(dataset_steps=600)
        small.cache_dataset(progress=False)
        data = small.load_dataset(progress=False)
        assert len(data.rewards) == 600 and data.task == card.name


@pytest.mark.parametrize("name", ["halfcheetah-medium-replay-v1"])
def test_task_card_statistics_match_the_arrays(name):
    """A card's recorded statistics are those of the arrays its recipe makes (the smallest v1 set,
    150k steps, about 30 s; the others were recorded the same way by `diffplan data make`)."""
    from diffplan.envs.tasks import get_task

    card = get_task(name)
    assert card.extras["stats"] is not None, f"{name}: no statistics recorded on the card"
    data = card.make_dataset(progress=False)
    assert L.dataset_stats(data) == card.extras["stats"]
