"""Locomotion task cards: registry, eval env protocol, reference scores, dataset through the card."""

import numpy as np
import pytest

from diffplan.envs import locomotion as L
from diffplan.envs.tasks import get_task, list_tasks

NAMES = [f"{f}-{k}" for f in L.FAMILIES for k in L.KINDS]


def test_all_cards_registered():
    assert set(NAMES) <= set(list_tasks())


@pytest.mark.parametrize("name", NAMES)
def test_card_protocol(name):
    card = get_task(name)
    family = name.split("-")[0]
    assert card.env_id == L.FAMILIES[family] and card.episode_steps == 1000
    assert (card.ref_min_score, card.ref_max_score) == L.D4RL_REF[family]
    assert card.d4rl_ref_min_score == card.ref_min_score
    assert card.extras["random_return_v5"] == L.RANDOM_RETURN_V5[family]
    assert card.family == "locomotion" and not card.is_goal_env
    env = card.make_env()
    try:
        assert env.spec.max_episode_steps == 1000
    finally:
        env.close()


def test_random_return_matches_card():
    mean, _ = L.measure_random_return("Hopper-v5", episodes=100)
    assert mean == pytest.approx(L.RANDOM_RETURN_V5["hopper"], abs=0.01)


def test_card_dataset_with_shipped_snapshots():
    if not L.list_snapshots("hopper"):
        pytest.skip("no hopper behavior snapshots shipped under checkpoints/behavior/hopper")
    card = get_task("hopper-medium")
    d = card.make_dataset(progress=False, steps=600)
    assert d.task == "hopper-medium" and d.env_id == "Hopper-v5" and len(d.rewards) == 600
    d2 = card.make_dataset(progress=False, steps=600)
    np.testing.assert_array_equal(d.actions, d2.actions)
    # the expert snapshot, run deterministically, is a policy with reset / act
    pol = card.make_expert()
    pol.reset()
    obs = np.zeros((3, 11), np.float32)
    a = pol.act(obs)
    assert a.shape == (3, 3) and np.all(np.abs(a) <= 1)


def test_evaluate_behavior_expert_on_card():
    """Locomotion episodes end early on env terminations (Hopper falls): evaluate() must cope."""
    if not L.list_snapshots("hopper"):
        pytest.skip("no hopper behavior snapshots shipped under checkpoints/behavior/hopper")
    from diffplan.eval.evaluate import evaluate

    card = get_task("hopper-medium")
    report = evaluate(card.make_expert(), card, episodes=3, num_envs=3)
    assert report.episodes == 3 and all(1 <= n <= 1000 for n in report.lengths)
    assert np.isfinite(report.normalized_mean)



def test_halfcheetah_envs_are_made_without_mujocos_settotalmass_warning(capfd):
    import mujoco

    get_task("halfcheetah-medium").make_env().close()
    L.make_env("HalfCheetah-v5").close()
    assert "settotalmass" not in capfd.readouterr().err
    seen = []
    mujoco.set_mju_user_warning(seen.append)
    try:
        with L.quiet_mujoco_compiler():
            handler = mujoco.get_mju_user_warning()
            handler("compiler attribute 'settotalmass' is deprecated and will be removed")
            handler("some other warning")
        assert seen == ["some other warning"]  # only the known one is dropped
        assert mujoco.get_mju_user_warning() is not None and seen == ["some other warning"]
        mujoco.get_mju_user_warning()("after")  # the previous handler is back
        assert seen[-1] == "after"
    finally:
        mujoco.set_mju_user_warning(None)


def test_v1_cards_without_their_behaviors_still_load_and_say_where_their_data_comes_from(monkeypatch, tmp_path):
    """Where checkpoints/behavior-v1/ is missing (an installed wheel), the v1 cards are still registered
    (their env and shipped policies work); making their data names the folder it needs."""
    from diffplan.envs import tasks as T

    monkeypatch.setattr(T, "_REGISTRY", {})
    real = L.behavior_dir
    monkeypatch.setattr(L, "behavior_dir", lambda version=0: tmp_path if version == 1 else real(version))
    L._register()
    card = get_task("walker2d-medium-replay-v1")
    assert card.env_id == "Walker2d-v5" and card.dataset_steps == L.DATASET_STATS[card.name]["steps"]
    with pytest.raises(FileNotFoundError, match=r"checkpoints/behavior-v1/walker2d/.*not in the wheel"):
        card.make_dataset(progress=False)
