"""OfflineDataset: validation, episode structure, returns, summaries, normalized scores."""

import numpy as np
import pytest

from diffplan.data import DatasetError, OfflineDataset


def make(n=12, ends=(3, 7), goals=False, **overrides):
    """n steps; episodes end after the steps listed in `ends` (and at the end of the arrays)."""
    rng = np.random.default_rng(0)
    timeouts = np.zeros(n, bool)
    timeouts[list(ends)] = True
    arrays = {"observations": rng.normal(size=(n, 3)), "actions": rng.normal(size=(n, 2)),
              "rewards": np.arange(n, dtype=np.float64), "terminals": np.zeros(n, bool),
              "timeouts": timeouts, "goals": rng.normal(size=(n, 2)) if goals else None}
    arrays.update(overrides)
    return OfflineDataset(**arrays)


def test_arrays_are_cast_to_float32_and_bool():
    d = make(terminals=np.zeros(12, np.int64))
    assert d.observations.dtype == np.float32 and d.rewards.dtype == np.float32
    assert d.terminals.dtype == bool


def test_episode_ends_are_exclusive_and_the_last_step_closes_an_episode():
    d = make()
    np.testing.assert_array_equal(d.episode_ends, [4, 8, 12])
    np.testing.assert_array_equal(d.episode_starts, [0, 4, 8])
    assert d.episode_ends.dtype == np.int64
    assert d.num_episodes == 3 and len(d) == 12


def test_terminals_end_episodes_too():
    terminals = np.zeros(12, bool)
    terminals[5] = True
    d = make(ends=(), terminals=terminals)
    np.testing.assert_array_equal(d.episode_ends, [6, 12])


def test_episode_returns_sum_rewards_per_episode():
    d = make()
    np.testing.assert_allclose(d.episode_returns(), [0 + 1 + 2 + 3, 4 + 5 + 6 + 7, 8 + 9 + 10 + 11])


def test_mismatched_lengths_name_the_key():
    with pytest.raises(DatasetError, match="'actions' has 11 steps"):
        make(actions=np.zeros((11, 2)))


def test_nan_observation_names_key_and_first_bad_index():
    obs = np.zeros((12, 3))
    obs[5, 1] = np.nan
    obs[9, 0] = np.inf
    with pytest.raises(DatasetError, match=r"'observations'.*first bad index 5"):
        make(observations=obs)


def test_wrong_shapes_and_types_are_rejected():
    with pytest.raises(DatasetError, match="'observations' must have shape"):
        make(observations=np.zeros(12))
    with pytest.raises(DatasetError, match="'timeouts' must be booleans"):
        make(timeouts=np.full(12, 0.5))
    with pytest.raises(DatasetError, match="'actions' must hold numbers"):
        make(actions=np.array([["a", "b"]] * 12))
    with pytest.raises(DatasetError, match="empty"):
        make(n=0, ends=())


def test_bad_reference_scores_are_rejected():
    with pytest.raises(DatasetError, match="ref_max_score"):
        make(ref_min_score=5.0, ref_max_score=1.0)


def test_normalized_score_is_d4rl_formula():
    d = make(ref_min_score=10.0, ref_max_score=110.0)
    assert d.normalized_score(60.0) == pytest.approx(50.0)
    np.testing.assert_allclose(d.normalized_score(np.array([10.0, 110.0])), [0.0, 100.0])
    with pytest.raises(DatasetError, match="no reference scores"):
        make().normalized_score(1.0)


def test_summary_counts_and_stats():
    s = make(goals=True, ref_min_score=0.0, ref_max_score=1.0).summary()
    assert s["num_steps"] == 12 and s["num_episodes"] == 3 and s["goal_dim"] == 2
    assert s["episode_length"]["min"] == 4 and s["episode_return"]["max"] == 38
    assert s["ref_max_score"] == 1.0 and s["num_timeouts"] == 2


def test_episodes_yields_views_per_episode():
    eps = list(make(goals=True).episodes())
    assert [len(e["rewards"]) for e in eps] == [4, 4, 4]
    assert set(eps[0]) >= {"observations", "goals", "timeouts"}
