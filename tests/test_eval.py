"""evaluate() on the maze expert reproduces the task card's ref_max; reports save JSON and a PNG."""
import json

import numpy as np
import pytest

from diffplan.envs import get_task
from diffplan.eval import evaluate

TASK = "pointmaze-umaze"


@pytest.fixture(scope="module")
def expert_report():
    card = get_task(TASK)
    return evaluate(card.make_expert(), card, episodes=20, num_envs=10, seed=0, record=2)


def test_evaluate_on_the_expert_reproduces_ref_max_within_noise(expert_report):
    r = expert_report
    assert r.episodes == 20 and len(r.returns) == 20
    # ref_max is the expert's mean return over 100 episodes: 20 of them agree within a few SE
    assert abs(r.normalized_mean - 100.0) < 3 * r.normalized_stderr + 2.0
    assert r.success_rate >= 0.95
    assert all(length == get_task(TASK).episode_steps for length in r.lengths)


def test_report_records_latency_and_decisions_per_second(expert_report):
    r = expert_report
    assert 0 < r.latency_p50_ms <= r.latency_p99_ms
    assert r.decisions_per_s > 0 and r.num_envs == 10


def test_report_save_writes_json_and_png(expert_report, tmp_path):
    out = expert_report.save(tmp_path / "report")
    data = json.loads((out / "report.json").read_text())
    assert data["task"] == TASK and len(data["returns"]) == 20
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_the_return_histogram_is_at_least_min_width_wide_and_covers_every_return():
    from diffplan.eval.plots import hist_range

    lo, hi = hist_range(np.array([109.20, 109.23]), 10.0)  # near-equal returns: a readable axis
    assert hi - lo == pytest.approx(10.0) and (lo + hi) / 2 == pytest.approx(109.215)
    assert hist_range(np.array([3.0, 50.0, 20.0]), 10.0) == (3.0, 50.0)  # wide enough already


def test_write_metrics_replaces_atomically_and_keeps_a_larger_evaluation_of_the_same_weights(
        expert_report, tmp_path):
    path = tmp_path / "metrics.json"
    (tmp_path / "model.safetensors").write_bytes(b"weights v1")
    (tmp_path / "config.yaml").write_text("kind: bc\n")
    assert expert_report.write_metrics(tmp_path)
    fingerprint = json.loads(path.read_text())["checkpoint_sha256"]
    path.write_text(json.dumps({"episodes": 50, "normalized_mean": 1.0, "checkpoint_sha256": fingerprint}))
    assert not expert_report.write_metrics(tmp_path, keep_larger=True)  # same weights, 20 < 50: kept
    assert json.loads(path.read_text())["normalized_mean"] == 1.0
    (tmp_path / "config.yaml").write_text("kind: bc\ntemperature: 0\n")  # an inference setting changed
    assert expert_report.write_metrics(tmp_path, keep_larger=True)  # the old score is stale: replaced
    assert json.loads(path.read_text())["episodes"] == 20
    path.write_text(json.dumps({"episodes": 50, "normalized_mean": 1.0}))  # no fingerprint: replaced
    assert expert_report.write_metrics(tmp_path, keep_larger=True)
    path.write_text("{truncated")  # an unreadable file never blocks a new evaluation
    assert expert_report.write_metrics(tmp_path, keep_larger=True)
    assert expert_report.write_metrics(tmp_path)  # by default the new evaluation replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "metrics.json", "model.safetensors"]


class GreedyToGoal:
    """A deterministic stand-in policy: push straight toward the goal."""

    def reset(self, mask=None):
        pass

    def act(self, obs):
        return np.clip(3.0 * (obs["desired_goal"] - obs["observation"][..., :2]), -1, 1)


def test_same_seed_gives_the_same_episodes_whatever_the_number_of_envs():
    card = get_task(TASK)
    a = evaluate(GreedyToGoal(), card, episodes=4, num_envs=2, seed=11)
    b = evaluate(GreedyToGoal(), card, episodes=4, num_envs=4, seed=11)
    np.testing.assert_array_equal(a.returns, b.returns)
    c = evaluate(GreedyToGoal(), card, episodes=4, num_envs=4, seed=12)
    assert a.returns != c.returns
