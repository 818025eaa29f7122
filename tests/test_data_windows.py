"""SequenceWindows: episode boundaries, padding, batched sampling, returns-to-go, value, goals."""

import numpy as np
import pytest

from diffplan.data import (
    DatasetError,
    LimitsNormalizer,
    OfflineDataset,
    SequenceWindows,
    discounted_returns,
)


def many_short_episodes(n=3000, seed=0):
    """Episodes of 1 to 20 steps; observation column 0 holds the episode index, column 1 the
    step index inside the episode, so a window that crossed an episode end would show it."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 21, size=n)
    lengths = lengths[np.cumsum(lengths) <= n]
    lengths = np.append(lengths, n - lengths.sum()) if lengths.sum() < n else lengths
    episode = np.repeat(np.arange(len(lengths)), lengths)
    step = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    timeouts = np.zeros(n, bool)
    timeouts[np.cumsum(lengths) - 1] = True
    obs = np.stack([episode, step, rng.normal(size=n)], axis=1)
    return OfflineDataset(observations=obs, actions=rng.normal(size=(n, 2)),
                          rewards=rng.normal(size=n), terminals=np.zeros(n, bool),
                          timeouts=timeouts, goals=np.stack([episode, -episode], 1))


def test_windows_never_cross_an_episode_end():
    data = many_short_episodes()
    w = SequenceWindows(data, horizon=8)
    batch = w.get_batch(np.arange(len(w)))
    episode, step = batch["observations"][..., 0], batch["observations"][..., 1]
    assert (episode == episode[:, :1]).all()
    assert (np.diff(step, axis=1) == 1).all()
    assert batch["mask"].all()
    # exactly the windows that fit: sum over episodes of max(L - H + 1, 0)
    assert len(w) == np.maximum(data.episode_lengths - 8 + 1, 0).sum()


def test_padding_repeats_the_last_observation_and_zeros_actions_and_rewards():
    data = many_short_episodes()
    w = SequenceWindows(data, horizon=8, keys=("observations", "actions", "rewards"), pad=True)
    assert len(w) == len(data)  # with padding every step starts a window
    b = w.get_batch(np.arange(len(w)))
    real = b["mask"].astype(bool)
    episode = b["observations"][..., 0]
    assert (episode == episode[:, :1]).all()
    last = data.observations[w.ends - 1]
    pad_rows = np.broadcast_to(last[:, None], b["observations"].shape)
    np.testing.assert_array_equal(b["observations"][~real], pad_rows[~real])
    assert (b["actions"][~real] == 0).all() and (b["rewards"][~real] == 0).all()
    # the real part is the data itself
    i = int(np.flatnonzero(~real.all(axis=1))[0])
    n_real = int(real[i].sum())
    np.testing.assert_array_equal(b["actions"][i, :n_real],
                                  data.actions[w.starts[i]:w.starts[i] + n_real])
    assert n_real == w.ends[i] - w.starts[i]


def test_pad_obs_fn_fills_the_padding():
    data = many_short_episodes()
    fn = lambda last, goal: np.array([goal[0], goal[1], 0.0])
    w = SequenceWindows(data, horizon=6, pad=True, pad_obs_fn=fn)
    b = w.get_batch(np.arange(len(w)))
    real = b["mask"].astype(bool)
    goals = data.goals[w.ends - 1]
    expect = np.broadcast_to(np.c_[goals, np.zeros(len(goals))][:, None], b["observations"].shape)
    np.testing.assert_array_equal(b["observations"][~real], expect[~real])


def test_sample_equals_getitem_for_the_same_indices():
    data = many_short_episodes()
    w = SequenceWindows(data, horizon=5, pad=True, returns_to_go=True, value=True, goal=True)
    batch = w.sample(16, np.random.default_rng(3))
    idx = np.random.default_rng(3).integers(0, len(w), size=16)
    for b, i in enumerate(idx):
        item = w[int(i)]
        assert item.keys() == batch.keys()
        for key in item:
            np.testing.assert_array_equal(batch[key][b], item[key], err_msg=key)
    assert batch["observations"].shape == (16, 5, 3) and batch["returns_to_go"].shape == (16, 5, 1)
    assert batch["value"].shape == (16, 1) and batch["goal"].shape == (16, 2)
    assert batch["mask"].shape == (16, 5)


def test_returns_to_go_and_value_on_a_hand_computed_example():
    # two episodes: rewards [1, 2, 3] and [10, 20]; discount 0.5
    data = OfflineDataset(observations=np.zeros((5, 1)), actions=np.zeros((5, 1)),
                          rewards=[1, 2, 3, 10, 20], terminals=[0, 0, 1, 0, 0],
                          timeouts=[0, 0, 0, 0, 1])
    w = SequenceWindows(data, horizon=2, keys=("rewards",), returns_to_go=True, value=True,
                        discount=0.5, pad=True)
    # rtg: 1 + .5*2 + .25*3 = 2.75; 2 + .5*3 = 3.5; 3; 10 + .5*20 = 20; 20
    np.testing.assert_allclose(w[0]["returns_to_go"][:, 0], [2.75, 3.5])
    np.testing.assert_allclose(w[2]["returns_to_go"][:, 0], [3.0, 0.0])  # padding: 0
    np.testing.assert_allclose(w[3]["returns_to_go"][:, 0], [20.0, 20.0])
    assert w[1]["value"][0] == pytest.approx(3.5)
    assert w[4]["value"][0] == pytest.approx(20.0)


def test_discounted_returns_match_a_loop_on_long_and_short_episodes():
    rng = np.random.default_rng(0)
    ends = np.array([1, 2, 400, 403, 1000])
    rewards = rng.normal(size=1000)
    expect = np.zeros(1000)
    for start, end in zip(np.r_[0, ends[:-1]], ends):
        acc = 0.0
        for i in range(end - 1, start - 1, -1):
            acc = rewards[i] + 0.97 * acc
            expect[i] = acc
    np.testing.assert_allclose(discounted_returns(rewards, ends, 0.97), expect, rtol=1e-10)


def test_normalizers_apply_to_outputs_and_goal():
    data = many_short_episodes()
    obs_norm = LimitsNormalizer.from_data(data.observations)
    goal_norm = LimitsNormalizer.from_data(data.goals)
    w = SequenceWindows(data, horizon=4, goal=True,
                        normalizers={"observations": obs_norm, "goals": goal_norm})
    item = w[7]
    np.testing.assert_allclose(obs_norm.unnormalize(item["observations"]),
                               data.observations[w.starts[7]:w.starts[7] + 4], atol=1e-5)
    np.testing.assert_allclose(goal_norm.unnormalize(item["goal"]), data.goals[w.starts[7]],
                               atol=1e-5)


def test_bad_requests_raise_clear_errors():
    data = many_short_episodes().replace(goals=None)
    with pytest.raises(DatasetError, match="no window of horizon 64 fits"):
        SequenceWindows(data, horizon=64)
    with pytest.raises(DatasetError, match="no goals"):
        SequenceWindows(data, horizon=4, goal=True)
    with pytest.raises(DatasetError, match="unknown window key 'obs'"):
        SequenceWindows(data, horizon=4, keys=("obs",))
    with pytest.raises(DatasetError, match="normalizer given for 'goals'"):
        SequenceWindows(data, horizon=4, normalizers={"goals": LimitsNormalizer(2)})


def test_termination_penalty_lowers_the_value_of_windows_before_a_terminal_step():
    # as the hand-computed example: episode [1, 2, 3] terminates, [10, 20] times out; discount 0.5
    data = OfflineDataset(observations=np.zeros((5, 1)), actions=np.zeros((5, 1)),
                          rewards=[1, 2, 3, 10, 20], terminals=[0, 0, 1, 0, 0],
                          timeouts=[0, 0, 0, 0, 1])
    w = SequenceWindows(data, horizon=2, keys=("rewards",), returns_to_go=True, value=True,
                        discount=0.5, pad=True, termination_penalty=-100.0)
    # the terminal step is k = 2, 1, 0 steps after windows 0, 1, 2: value lower by 0.5**k * 100
    assert [w[i]["value"][0] for i in range(3)] == pytest.approx([2.75 - 25, 3.5 - 50, 3 - 100])
    assert w[3]["value"][0] == pytest.approx(20.0)  # a timeout is not penalised
    np.testing.assert_allclose(w[0]["returns_to_go"][:, 0], [2.75 - 25, 3.5 - 50])
    assert w[0]["rewards"][:, 0].tolist() == [1, 2]  # the rewards themselves are left as they are


def test_episode_return_is_the_whole_episodes_undiscounted_return_for_every_window():
    data = many_short_episodes()
    windows = SequenceWindows(data, 4, pad=True, episode_return=True, discount=0.5)
    b = windows.get_batch(np.arange(len(windows)))
    episode = b["observations"][:, 0, 0].astype(int)  # column 0: the episode index
    totals = np.array([data.rewards[s:e].sum() for s, e in zip(data.episode_starts, data.episode_ends)])
    np.testing.assert_allclose(b["episode_return"][:, 0], totals[episode], rtol=1e-5, atol=1e-5)
    assert "value" not in b and "episode_return" not in SequenceWindows(data, 4, pad=True).sample(3, np.random.default_rng(0))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs CUDA"))])
def test_device_windows_gather_what_the_host_windows_gather(device):
    import torch

    data = many_short_episodes()
    fn = lambda last, goal: np.array([goal[0], goal[1], 0.0])
    for kw in (dict(pad=True, pad_obs_fn=fn, returns_to_go=True, value=True, goal=True, episode_return=True),
               dict(pad=False, stride=2, keys=("observations", "actions", "rewards"), value=True)):
        w = SequenceWindows(data, horizon=5, **kw)
        on = w.to(device)
        idx = np.random.default_rng(0).integers(0, len(w), size=64)
        host, dev = w.get_batch(idx), on.get_batch(torch.from_numpy(idx))
        assert host.keys() == dev.keys()
        for key in host:
            assert dev[key].device.type == device and dev[key].dtype == torch.float32, key
            np.testing.assert_array_equal(dev[key].cpu().numpy(), host[key], err_msg=key)
        # sample(): the windows named by the indices torch's generator draws, on the device
        g = torch.Generator(device).manual_seed(5)
        drawn = torch.randint(len(w), (32,), device=device, generator=torch.Generator(device).manual_seed(5))
        b = on.sample(32, generator=g)
        np.testing.assert_array_equal(b["observations"].cpu().numpy(), w.get_batch(drawn.cpu().numpy())["observations"])
