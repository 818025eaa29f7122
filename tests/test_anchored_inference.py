"""The anchored policy's fast inference path (cached FiLM of the solver grid, classification heads
only where read) gives what the plain cascade evaluation gives, and follows weight changes."""
import itertools

import numpy as np
import pytest
import torch

from diffplan.policies.anchored import AnchoredConfig, AnchoredDiffusionPolicy
from diffplan.policies.base import SpaceSpec
from diffplan.runtime.planner import PlannerConfig

torch.set_num_threads(1)

SPEC = SpaceSpec(obs_dim=4, act_dim=2, action_low=(-1.0, -1.0), action_high=(1.0, 1.0), goal_dim=2)


def policy(steps=2, stages=2):
    torch.manual_seed(0)
    p = AnchoredDiffusionPolicy(AnchoredConfig(chunk=4, num_anchors=5, width=16, heads=2, stages=stages,
                                               steps=steps, truncation=0.2,
                                               runtime=PlannerConfig(n_action_steps=4)), SPEC)
    p.fit_anchors(torch.randn(100, 4, 2))
    with torch.no_grad():
        for prm in p.parameters():
            prm.add_(0.2 * torch.randn_like(prm))
    return p.eval()


def reference(p, obs, goal, noise, steps):
    """The plain evaluation: time embedding and FiLM every call, every head, every DDIM update."""
    t0 = float(p.t_trunc)
    grid = p._grid(t0, steps)
    kvs = p.context(obs, goal)
    x = grid[0][1] * p.anchors + grid[0][2] * noise[:, None]
    b = x.shape[0]
    for (t, a, s), (_, a_next, s_next) in itertools.pairwise(grid):
        tt = torch.full((b,), t)
        x0, logits = p.net(x, tt, kvs)[-1]
        x = a_next * x0 + s_next * (x - a * x0) / s
    return x0, logits


def test_fast_denoise_matches_the_plain_cascade():
    for steps, stages in ((2, 2), (3, 1), (1, 3)):
        p = policy(steps, stages)
        g = torch.Generator().manual_seed(1)
        obs, goal, noise = torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g), torch.randn(6, 4, 2, generator=g)
        with torch.inference_mode():
            x0, logits = p.denoise_anchors(obs, goal, noise)
            rx0, rlogits = reference(p, obs, goal, noise, steps)
        torch.testing.assert_close(x0, rx0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, rlogits, atol=1e-5, rtol=1e-5)


def test_cached_film_follows_weight_updates():
    p = policy()
    obs, goal, noise = torch.randn(3, 4), torch.randn(3, 2), torch.randn(3, 4, 2)
    with torch.inference_mode():
        before, _ = p.denoise_anchors(obs, goal, noise)
    with torch.no_grad():  # an optimizer step or load_state_dict changes the weights in place
        p.net.time[0].weight.add_(0.5)
        p.net.stages[1].film.bias.add_(0.5)
    with torch.inference_mode():
        after, _ = p.denoise_anchors(obs, goal, noise)
        ref, _ = reference(p, obs, goal, noise, 2)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=1e-5)


def test_inference_skips_unread_classification_heads():
    p = policy()
    heads = [0] * len(p.net.stages)
    for s, stage in enumerate(p.net.stages):
        stage.cls.register_forward_hook(lambda m, a, o, s=s: heads.__setitem__(s, heads[s] + 1))
    obs = {"observation": np.zeros((2, 4), np.float32), "desired_goal": np.ones((2, 2), np.float32)}
    p.reset(seed=0)
    p.act(obs)
    assert heads == [0, 1]  # only the last stage, only at the last of the 2 steps


def _recording_starts(p):
    """Wrap ``p._grid`` to record the noise level every plan starts at."""
    starts, grid = [], p._grid
    p._grid = lambda t_start, steps: starts.append(t_start) or grid(t_start, steps)
    return starts


def test_inference_start_is_a_fraction_of_the_trained_range():
    p = policy()
    trunc = float(p.t_trunc)
    starts = _recording_starts(p)
    obs, goal, noise = torch.randn(3, 4), torch.randn(3, 2), torch.randn(3, 4, 2)
    for frac in (None, 1.0, 0.5, 0.16):
        p.config.t_start = frac
        with torch.inference_mode():
            p.plan(obs, goal, noise, t_start=1.0)  # the runtime's level is not used
    assert starts == pytest.approx([trunc, trunc, 0.5 * trunc, 0.16 * trunc])  # None: the top, as shipped
    with pytest.raises(ValueError, match="fraction of the truncation level"):
        AnchoredConfig(t_start=1.5)


def test_warm_start_starts_inside_the_trained_range_from_the_previous_chunk():
    from diffplan.runtime.planner import Planner

    p = policy()
    trunc = float(p.t_trunc)
    runtime = PlannerConfig(n_action_steps=2, warm_start=True, t_warm=0.3, seed=0)  # 0.3 > t_trunc = 0.2
    planner = Planner(p, runtime)
    starts = _recording_starts(p)
    obs, goal = torch.randn(2, 4), torch.randn(2, 2)
    with torch.inference_mode():
        for _ in range(3):  # cold plan, one executed action, then a warm replan
            planner.act(obs, goal)
    assert starts[0] == pytest.approx(trunc) and starts[-1] == pytest.approx(p.config.t_warm * trunc)
    assert 0 < starts[-1] <= trunc
    noise = torch.randn(2, 4, 2)
    prev = torch.randn(2, 2, 4, 2, generator=torch.Generator().manual_seed(3))  # two previous chunks per env
    with torch.inference_mode():
        (a, la), (b, _) = (p.denoise_anchors(obs, goal, noise, prior=x) for x in prev)
    k = p.config.num_anchors
    assert a.shape[1] == k + 1 and la.shape == (2, k + 1)  # the previous chunk is one more query
    torch.testing.assert_close(a[:, :k], b[:, :k])  # the anchors' queries do not see it
    assert (a[:, k] - b[:, k]).abs().amax() > 1e-3  # its own query refines it
    assert (a[:, k] - prev[0]).abs().amax() < (a[:, k] - prev[1]).abs().amax()
