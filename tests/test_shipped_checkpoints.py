"""Every shipped checkpoint loads by itself and acts: a change to a network's parameter layout,
or to a config field, that would strand users' checkpoints fails here."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import diffplan
from diffplan.envs import get_task
from diffplan.eval.evaluate import checkpoint_fingerprint

ROOT = Path(__file__).resolve().parents[1]
CRITICS = sorted(p.parent for p in ROOT.glob("checkpoints/*/critic/model.safetensors"))  # they score, not act
SHIPPED = sorted(p.parent for p in ROOT.glob("checkpoints/*/*/model.safetensors") if p.parent not in CRITICS)


def test_the_demo_checkpoint_is_shipped():
    assert ROOT / "checkpoints/pointmaze-umaze/diffuser" in SHIPPED


@pytest.mark.parametrize("folder", SHIPPED, ids=[f"{p.parent.name}/{p.name}" for p in SHIPPED])
def test_shipped_checkpoint_loads_and_acts_inside_the_action_space(folder):
    policy = diffplan.load_policy(folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert policy.kind == config["kind"] and policy.spec.task == folder.parent.name
    env = get_task(policy.spec.task).make_env()
    obs, _ = env.reset(seed=0)
    policy.reset(seed=0)
    for _ in range(3):
        action = policy.act(obs)
        assert env.action_space.contains(action.astype(np.float32))
        obs, *_ = env.step(action)
    assert (folder / "metrics.json").exists(), "shipped checkpoints carry their evaluation"
    measured = json.loads((folder / "metrics.json").read_text()).get("checkpoint_sha256")
    if measured is not None:  # evaluations written since the fingerprint existed
        assert measured == checkpoint_fingerprint(folder), (
            "metrics.json was measured on other weights or another config.yaml: re-evaluate")


@pytest.mark.parametrize("folder", CRITICS, ids=[f"{p.parent.name}/{p.name}" for p in CRITICS])
def test_shipped_critic_loads_and_scores_the_task_env_actions(folder):
    import torch

    critic = diffplan.load_policy(folder)
    assert critic.kind == "critic" and critic.spec.task == folder.parent.name
    env = get_task(critic.spec.task).make_env()
    obs, _ = env.reset(seed=0)
    actions = np.stack([env.action_space.sample() for _ in range(4)])
    q = critic.q_value(torch.as_tensor(np.repeat(obs[None], 4, 0), dtype=torch.float32),
                       torch.as_tensor(actions, dtype=torch.float32))
    assert q.shape == (4,) and torch.isfinite(q).all()
