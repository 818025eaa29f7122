"""A run is a function of its seeds: training through the CLI, and every random draw of a plan
(per-env generators, whatever the batch)."""
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffplan.cli import main
from diffplan.data import OfflineDataset
from diffplan.diffusion import Schedule, sample
from diffplan.envs import get_task
from diffplan.policies import DiffuserConfig, DiffuserPlanner, DiffusionPolicy, DiffusionPolicyConfig
from diffplan.policies.finetune.ctrl import CTRLConfig, CTRLPlanner
from diffplan.runtime import Planner, PlannerConfig

TASK = "pointmaze-umaze"


def test_training_the_same_config_twice_through_the_cli_gives_bit_identical_tensors(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    OfflineDataset(rng.normal(size=(n, 4)), rng.uniform(-1, 1, (n, 2)), rng.normal(size=n), np.zeros(n, bool),
                   np.arange(n) % 50 == 49).to_npz(tmp_path / "d.npz")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "kind": "diffuser", "dataset": str(tmp_path / "d.npz"),
        "policy": {"horizon": 8, "dim": 8, "dim_mults": [1, 2], "normalizer": "gaussian", "pad": False},
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "progress": False, "seed": 5}}))
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(len(name) + len(runs))  # a different global RNG state before each run
        assert main(["train", str(config), "--out", str(tmp_path / name)]) == 0
        ckpt = tmp_path / name / "checkpoints" / "step-00000003"
        runs.append({f: load_file(ckpt / f) for f in ("model.safetensors", "optimizer.safetensors")})
    for f, tensors in runs[0].items():
        assert tensors.keys() == runs[1][f].keys()
        for key, value in tensors.items():
            assert torch.equal(value, runs[1][f][key]), f"{f}: {key}"


# ---------------------------------------------------------------------------------------------
# Stochastic sampler steps draw from each env's own generator

@pytest.fixture(scope="module")
def maze():
    return get_task(TASK).make_dataset(progress=False, steps=1000, seed=3)


def _obs(batch):
    env = get_task(TASK).make_env()
    obs = [env.reset(seed=i)[0] for i in range(batch)]
    return {k: np.stack([o[k] for o in obs]) for k in obs[0]}


def _diffuser(maze):
    return DiffuserPlanner.from_dataset(maze, DiffuserConfig(horizon=8, dim=8, dim_mults=(1, 2), solver="ddpm",
                                                             steps=3))


def _diffusion_policy(maze):
    cfg = DiffusionPolicyConfig(horizon=8, dim=8, dim_mults=(1, 2), solver="ddpm", steps=3, objective="x0")
    return DiffusionPolicy.from_dataset(maze, cfg)


def _anchored(maze):
    from diffplan.policies import AnchoredConfig, AnchoredDiffusionPolicy

    cfg = AnchoredConfig(chunk=4, num_anchors=4, width=16, heads=2, kmeans_iters=5, kmeans_samples=500,
                         runtime=PlannerConfig(n_action_steps=4),
                         temperature=1.0)
    return AnchoredDiffusionPolicy.from_dataset(maze, cfg)


def _ctrl(maze):
    base = DiffuserPlanner.from_dataset(maze, DiffuserConfig(horizon=8, dim=8, dim_mults=(1, 2), inpaint_goal=False))
    cfg = CTRLConfig(steps=3, classifier_steps=2, classifier_windows=200, side_hidden=8, side_depth=1)
    return CTRLPlanner.from_pretrained(base, maze, cfg)


@pytest.mark.parametrize("build", [_diffuser, _diffusion_policy, _ctrl, _anchored],
                         ids=["ddpm", "dp-ddpm", "ctrl", "anchored-sampled-query"])
def test_stochastic_plans_repeat_with_the_seed_and_do_not_depend_on_the_batch(maze, build):
    torch.manual_seed(0)
    policy = build(maze).eval()
    obs = _obs(3)
    runs = []
    for global_seed in (1, 2):  # the global RNG must not matter
        torch.manual_seed(global_seed)
        policy.reset(seed=7)
        runs.append(policy.act(obs))
    np.testing.assert_array_equal(*runs)
    for i in range(3):  # each env alone, seeded as it was in the batch
        policy.reset(seed=[7 + i])
        alone = policy.act({k: v[i: i + 1] for k, v in obs.items()})
        np.testing.assert_allclose(alone[0], runs[0][i], atol=1e-4)  # same noise; batched kernels round differently


@pytest.mark.parametrize("solver, eta", [("ddpm", None), ("ddim", 0.5)])
def test_sample_with_one_generator_per_row_matches_each_row_alone(solver, eta):
    schedule = Schedule.vp_cosine()
    denoise = lambda x, t: 0.5 * x  # noqa: E731
    x = torch.zeros(3, 4, 2)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batched = sample(denoise, x, schedule, solver=solver, eta=eta, steps=4, generator=gens([0, 1, 2]))
    for i in range(3):
        alone = sample(denoise, x[:1], schedule, solver=solver, eta=eta, steps=4, generator=gens([i]))
        assert torch.equal(alone[0], batched[i])


class _NoisePlanner:
    """Plans are the noise itself: the action is the first row of each env's noise."""

    plan_shape = (4, 2)
    default_steps = 1

    def plan(self, obs, goal, noise, *, warm=None, t_start=1.0, steps=None, generator=None):
        return noise

    def action_at(self, plans, index, obs, goal):
        return plans[:, 0]


def test_changing_the_batch_size_after_a_seeded_reset_stays_deterministic():
    def run():
        planner = Planner(_NoisePlanner())
        planner.reset(seed=3)
        planner.act(torch.zeros(2, 2))
        planner.reset()
        return planner.act(torch.zeros(4, 2))  # a new batch size: new generators, from the seed

    first = run()
    assert torch.equal(first, run())
    fresh = Planner(_NoisePlanner())
    fresh.reset(seed=3)
    assert torch.equal(first, fresh.act(torch.zeros(4, 2)))


def test_extra_value_guided_candidates_come_from_the_given_generators(maze):
    cfg = DiffuserConfig(horizon=8, dim=8, dim_mults=(1, 2), steps=2, value_guided=True, n_samples=3)
    torch.manual_seed(0)
    policy = DiffuserPlanner.from_dataset(maze, cfg).eval()
    obs = torch.as_tensor(_obs(2)["observation"])
    noise = torch.zeros(2, *policy.plan_shape)  # one candidate per env given; the other two are drawn
    plans = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
        plans.append(policy.plan(obs, None, noise, generator=gens))
    assert torch.equal(*plans)
