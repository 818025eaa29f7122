"""The tiny behavior actor reproduces SB3 SAC's actor from exported safetensors + YAML."""

import numpy as np
import pytest
import torch

from diffplan.envs.behavior import (ActorMeta, TanhGaussianActor, d4rl_normalized,
                                    evaluate_actor, export_sb3_actor, load_actor)


def _sb3_sac(steps=100):
    sb3 = pytest.importorskip("stable_baselines3", reason="stable-baselines3 is not installed "
                              "(optional extra diffplan[behavior]); the export test needs it")
    import gymnasium as gym

    torch.set_num_threads(1)
    env = gym.make("Hopper-v5")
    model = sb3.SAC("MlpPolicy", env, learning_starts=50, batch_size=32, seed=0, device="cpu",
                    buffer_size=1000, verbose=0)
    model.learn(steps)
    return model, env


def test_export_matches_sb3_predict(tmp_path):
    model, env = _sb3_sac()
    path = export_sb3_actor(model, tmp_path / "actor", {"env_id": "Hopper-v5", "train_step": 100,
                                                        "note": "test"})
    assert (path / "actor.safetensors").exists() and (path / "actor.yaml").exists()
    actor = load_actor(path)
    assert actor.meta.env_id == "Hopper-v5" and actor.meta.train_step == 100
    assert actor.meta.extra["note"] == "test"

    rng = np.random.default_rng(0)
    obs = np.stack([env.reset(seed=i)[0] for i in range(8)]).astype(np.float32)
    obs = obs + rng.normal(0, 0.5, obs.shape).astype(np.float32)
    ref, _ = model.predict(obs, deterministic=True)
    ours = actor.act(obs, deterministic=True)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # single observation
    np.testing.assert_allclose(actor.act(obs[0]), ref[0], atol=1e-5)

    # the stochastic head: same mean and clamped log std as SB3's actor
    with torch.no_grad():
        mu_ref, log_std_ref, _ = model.policy.actor.get_action_dist_params(torch.from_numpy(obs))
        mu, log_std = actor.dist_params(torch.from_numpy(obs))
    torch.testing.assert_close(mu, mu_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(log_std, log_std_ref, atol=1e-6, rtol=0)


def test_stochastic_actions_seeded_and_in_bounds():
    torch.manual_seed(0)
    meta = ActorMeta(obs_dim=5, act_dim=2, hidden_sizes=[16, 16], action_low=[-2.0, 0.0],
                     action_high=[2.0, 1.0], env_id="none")
    actor = TanhGaussianActor(5, 2, [16, 16], meta.action_low, meta.action_high, meta=meta)
    obs = np.random.default_rng(1).normal(size=(64, 5))
    a1 = actor.act(obs, deterministic=False, rng=np.random.default_rng(3))
    a2 = actor.act(obs, deterministic=False, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a1, a2)
    assert not np.allclose(a1, actor.act(obs, deterministic=True))
    assert (a1[:, 0] >= -2).all() and (a1[:, 0] <= 2).all()
    assert (a1[:, 1] >= 0).all() and (a1[:, 1] <= 1).all()


def test_save_load_roundtrip(tmp_path):
    meta = ActorMeta(obs_dim=4, act_dim=3, hidden_sizes=[8], action_low=[-1.0] * 3,
                     action_high=[1.0] * 3, env_id="x", train_step=7)
    actor = TanhGaussianActor(4, 3, [8], meta.action_low, meta.action_high, meta=meta)
    actor.save(tmp_path / "a")
    actor.save(tmp_path / "a")  # overwrite is atomic and allowed
    back = load_actor(tmp_path / "a")
    obs = np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(back.act(obs), actor.act(obs))
    assert back.meta.train_step == 7
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["a"]  # no tmp leftovers


def test_d4rl_normalized():
    assert d4rl_normalized("Hopper-v5", -20.272305) == pytest.approx(0.0)
    assert d4rl_normalized("Walker2d-v5", 4592.3) == pytest.approx(100.0)
    assert d4rl_normalized("Ant-v5", 1.0) is None


def test_evaluate_actor_runs():
    meta = ActorMeta(obs_dim=11, act_dim=3, hidden_sizes=[8], action_low=[-1.0] * 3,
                     action_high=[1.0] * 3, env_id="Hopper-v5")
    actor = TanhGaussianActor(11, 3, [8], meta.action_low, meta.action_high, meta=meta)
    mean, std, rets = evaluate_actor(actor, "Hopper-v5", episodes=2, max_steps=50)
    assert len(rets) == 2 and np.isfinite(mean)


def test_sac_training_records_its_pace_settings_and_resumes(tmp_path):
    """``train_freq`` and ``learning_rate`` (issue 23: slower SAC for D4RL-sized replay buffers)
    reach SB3 and every snapshot's metadata; a resumed run continues the step count."""
    pytest.importorskip("stable_baselines3")
    import yaml

    from diffplan.envs import behavior as B

    out, state = tmp_path / "run", tmp_path / "state"
    kw = dict(snapshot_every=100, eval_episodes=1, state_dir=state, state_every=100, learning_starts=50,
              train_freq=3, gradient_steps=2, learning_rate=1e-4)
    B.train("Hopper-v5", 200, out, **kw)
    meta = yaml.safe_load((out / "step-200" / "actor.yaml").read_text())
    extra = meta["extra"]
    assert (extra["train_freq"], extra["gradient_steps"]) == (3, 2) and extra["learning_rate"] == pytest.approx(1e-4)
    with open(out / "progress.csv", "a") as f:  # a run killed after its last saved state logged step 300
        f.write("300,1.0,0.0,0.0,1,0.0,0.0,step-300\n")
    B.train("Hopper-v5", 100, out, resume=True, **kw)
    steps = [int(r.split(",")[0]) for r in (out / "progress.csv").read_text().splitlines()[1:]]
    assert steps == [100, 200, 300]  # the redone step is logged once, by the resumed run
    assert (out / "progress.csv").read_text().splitlines()[-1].split(",")[1] != "1.0"
    # a resumed run keeps its saved ratio unless given one: then it changes from there on
    B.train("Hopper-v5", 100, out, resume=True, snapshot_every=100, eval_episodes=1, state_dir=state,
            state_every=100)
    extra = yaml.safe_load((out / "step-400" / "actor.yaml").read_text())["extra"]
    assert (extra["train_freq"], extra["gradient_steps"]) == (3, 2)
    B.train("Hopper-v5", 100, out, resume=True, snapshot_every=100, eval_episodes=1, state_dir=state,
            state_every=100, train_freq=1, gradient_steps=1)
    extra = yaml.safe_load((out / "step-500" / "actor.yaml").read_text())["extra"]
    assert (extra["train_freq"], extra["gradient_steps"]) == (1, 1)
    with pytest.raises(ValueError, match="train_freq must be >= 1"):
        B.train("Hopper-v5", 100, tmp_path / "bad", state_dir=tmp_path / "bad-state", train_freq=0)


@pytest.mark.parametrize("algo", ["sac", "tqc"])
def test_resume_state_without_the_replay_buffer_continues_the_run(tmp_path, algo):
    """The compact resume state (safetensors + JSON in ``<out>/resume/``) is all a fresh machine
    has: it restores the networks, Adam moments, entropy coefficient and counters exactly, refills
    the replay buffer with the current policy before training again, and records the refill."""
    pytest.importorskip("stable_baselines3")
    if algo == "tqc":
        pytest.importorskip("sb3_contrib")
    import yaml

    from diffplan.envs import behavior as B

    out = tmp_path / "run"
    kw = dict(snapshot_every=100, eval_episodes=1, state_every=100, learning_starts=50)
    B.train("Hopper-v5", 200, out, state_dir=tmp_path / "state", algo=algo, **kw)
    assert (out / "resume" / "state.json").exists() and not list(out.glob("resume/*.pkl"))

    # the state round-trips into a fresh model: every tensor, every counter
    import gymnasium as gym

    cls = __import__("sb3_contrib" if algo == "tqc" else "stable_baselines3").__dict__[algo.upper()]
    sb3 = cls.load(tmp_path / "state" / "model.zip", device="cpu")
    fresh = cls("MlpPolicy", gym.make("Hopper-v5"), device="cpu", **{k: v for k, v in B.SAC_HPARAMS.items()
                                                                      if k != "learning_starts"})
    meta = B.load_resume_state(fresh, out / "resume")
    assert meta["algo"] == algo and fresh.num_timesteps == sb3.num_timesteps == 200
    assert fresh._n_updates == sb3._n_updates > 0
    want, got = sb3.get_parameters(), fresh.get_parameters()
    for k, v in want["policy"].items():
        assert torch.equal(v, got["policy"][k]), k
    st_w, st_g = want["critic.optimizer"]["state"], got["critic.optimizer"]["state"]
    assert all(torch.equal(st_w[i]["exp_avg_sq"], st_g[i]["exp_avg_sq"]) for i in st_w)
    assert torch.equal(sb3.log_ent_coef, fresh.log_ent_coef)

    # a fresh machine: no SB3 state; the run refills its buffer and goes on counting
    B.train("Hopper-v5", 200, out, state_dir=tmp_path / "elsewhere", resume=True, refill=60, **kw)
    extra = yaml.safe_load((out / "step-400" / "actor.yaml").read_text())["extra"]
    assert extra["algo"] == f"sb3-{algo}" and extra["buffer_refills"] == [200]
    resumed = B.read_resume_meta(out / "resume")
    assert resumed["num_timesteps"] == 400
    # no gradient steps while the 60 refill steps fill the buffer, one per env step after them
    assert meta["n_updates"] + 130 <= resumed["n_updates"] <= meta["n_updates"] + 140
    steps = [int(r.split(",")[0]) for r in (out / "progress.csv").read_text().splitlines()[1:]]
    assert steps == [100, 200, 300, 400]
    other = "tqc" if algo == "sac" else "sac"
    with pytest.raises(ValueError, match=f"the saved run is {algo}, not {other}"):
        B.train("Hopper-v5", 200, out, state_dir=tmp_path / "elsewhere2", resume=True, algo=other, **kw)
    with pytest.raises(ValueError, match="holds a run on Hopper-v5, not Walker2d-v5"):
        B.train("Walker2d-v5", 200, out, state_dir=tmp_path / "elsewhere3", resume=True, **kw)
