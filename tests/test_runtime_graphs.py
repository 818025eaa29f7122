"""CUDA-graph plans (``PlannerConfig.cuda_graph``): the bookkeeping of ``diffplan.runtime.graphs``
on CPU through a stand-in backend that runs eagerly and counts captures and replays, the CPU
fallback, and (with a GPU) real captures against eager plans. Also the U-Net's CPU batch path."""
from pathlib import Path

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from diffplan.nn import unet
from diffplan.nn.unet import TemporalUNet
from diffplan.policies import load_policy
from diffplan.runtime import Planner, PlannerConfig
from diffplan.runtime.bench import example_observations
from diffplan.runtime.graphs import CaptureFailed, EagerBackend, PlanGraphs

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class NoisyPolicy:
    """Plans are a pure function of the inputs: noise * 2 + obs (warm: warm + noise); records calls."""

    plan_shape = (8, 2)
    default_steps = 3

    def __init__(self, problem=None):
        self.calls = 0
        self.problem = problem

    def capture_problem(self):
        return self.problem

    def plan(self, obs, goal, noise, *, warm=None, t_start=1.0, steps=None, generator=None):
        self.calls += 1
        base = noise * 2 if warm is None else warm + t_start * noise
        return base + obs[:, None, :1]

    def action_at(self, plans, index, obs, goal):
        return plans[torch.arange(plans.shape[0]), index.clamp(max=plans.shape[1] - 1)]


def graph_planner(policy, backend=None, batches=None, **cfg):
    planner = Planner(policy, PlannerConfig(cuda_graph=True, seed=0, **cfg))
    planner.graphs = PlanGraphs(backend=backend or EagerBackend(), batches=batches)
    return planner


def test_same_key_captures_once_and_replays_into_the_same_buffers():
    backend = EagerBackend()
    planner = graph_planner(NoisyPolicy(), backend)
    eager = Planner(NoisyPolicy(), PlannerConfig(seed=0))
    obs = torch.randn(3, 2)
    outs = []
    for _ in range(5):
        planner.reset(), eager.reset()
        a, b = planner.act(obs), eager.act(obs)
        torch.testing.assert_close(a, b)
        outs.append(planner.graphs.graphs[next(iter(planner.graphs.graphs))].out.data_ptr())
    assert (backend.captures, backend.replays, len(planner.graphs.graphs)) == (1, 5, 1)
    assert len(set(outs)) == 1  # one static output buffer, reused


def test_uncaptured_batch_size_plans_eagerly():
    backend = EagerBackend()
    planner = graph_planner(NoisyPolicy(), backend, batches=[2])
    planner.act(torch.zeros(3, 2))
    assert (backend.captures, planner.graphs.eager_calls) == (0, 1)
    planner.act(torch.zeros(2, 2))
    assert (backend.captures, backend.replays, planner.graphs.eager_calls) == (1, 1, 1)


def test_graph_budget_exhausted_plans_eagerly():
    planner = graph_planner(NoisyPolicy())
    planner.graphs.max_graphs = 2
    for b in (1, 2, 3):
        planner.act(torch.zeros(b, 2))
    assert len(planner.graphs.graphs) == 2 and planner.graphs.eager_calls == 1


def test_cold_and_warm_plans_get_their_own_graphs():
    backend = EagerBackend()
    planner = graph_planner(NoisyPolicy(), backend, warm_start=True, n_action_steps=1, t_warm=0.5)
    eager = Planner(NoisyPolicy(), PlannerConfig(seed=0, warm_start=True, n_action_steps=1, t_warm=0.5))
    obs = torch.randn(2, 2)
    for _ in range(4):  # cold, warm, warm, warm
        torch.testing.assert_close(planner.act(obs), eager.act(obs))
    assert backend.captures == 2 and backend.replays == 4
    (_, _, _, no_warm, *_), (_, _, _, warm_shape, t_warm, *_) = planner.graphs.graphs
    assert no_warm is None and warm_shape == (2, 8, 2) and t_warm == 0.5


def test_policy_that_cannot_be_captured_warns_once_and_plans_eagerly():
    backend = EagerBackend()
    planner = graph_planner(NoisyPolicy(problem="draws from CPU generators"), backend)
    with pytest.warns(RuntimeWarning, match="NoisyPolicy plans eagerly: draws from CPU generators"):
        planner.act(torch.zeros(1, 2))
    planner.reset()
    planner.act(torch.zeros(2, 2))
    assert backend.captures == 0 and planner.graphs.eager_calls == 2


def test_failed_capture_falls_back_to_eager():
    class Failing(EagerBackend):
        def capture(self, fn):
            raise CaptureFailed("operation not permitted when stream is capturing")

    policy = NoisyPolicy()
    planner = graph_planner(policy, Failing())
    with pytest.warns(RuntimeWarning, match="not permitted"):
        a = planner.act(torch.ones(1, 2))
    assert planner.graphs.disabled and policy.calls == 1 and torch.isfinite(a).all()


def test_cpu_without_a_backend_plans_eagerly_and_silently(recwarn):
    planner = Planner(NoisyPolicy(), PlannerConfig(cuda_graph=True, seed=0))
    eager = Planner(NoisyPolicy(), PlannerConfig(seed=0))
    obs = torch.randn(2, 2)
    torch.testing.assert_close(planner.act(obs), eager.act(obs))
    assert not planner.graphs.graphs and planner.graphs.eager_calls == 1 and not recwarn.list


@pytest.fixture(scope="module")
def umaze_diffuser():
    return load_policy(ROOT / "checkpoints/pointmaze-umaze/diffuser", device="cpu")


def _plans(policy, planner, obs, seeds):
    policy.planner = planner
    policy.reset(seed=seeds)
    policy.act(obs)
    return planner._plans.clone()


def test_per_env_noise_reaches_the_static_buffer(umaze_diffuser):
    """The Diffuser through the stand-in: the static noise buffer carries each env's own draw."""
    policy, saved = umaze_diffuser, umaze_diffuser.planner
    obs = example_observations(policy, 2)
    same = {k: v[[0, 0]] for k, v in obs.items()}
    try:
        backend = EagerBackend()
        graphed = _plans(policy, graph_planner(policy, backend), same, [1, 2])
        assert not torch.allclose(graphed[0], graphed[1], atol=1e-3)  # two seeds, two plans
        eager = _plans(policy, Planner(policy, PlannerConfig(**vars(saved.config))), same, [1, 2])
        torch.testing.assert_close(graphed, eager)
        again = _plans(policy, graph_planner(policy, backend), same, [7, 7])
        torch.testing.assert_close(again[0], again[1])  # same seed, same plan
        assert backend.captures == 2 and backend.replays == 2
    finally:
        policy.planner = saved


def test_shipped_planners_declare_what_cannot_be_captured(umaze_diffuser):
    assert umaze_diffuser.capture_problem() is None
    anchored = load_policy(ROOT / "checkpoints/pointmaze-umaze/anchored", device="cpu")
    assert anchored.capture_problem() is None
    anchored.config.temperature = 1.0
    assert "temperature" in anchored.capture_problem()


@cuda
@pytest.mark.parametrize("name", ["pointmaze-umaze/diffuser", "pointmaze-umaze/anchored", "hopper-medium/diffuser"])
def test_cuda_graph_plans_match_eager_plans(name, recwarn):
    policy = load_policy(ROOT / "checkpoints" / name, device="cuda")
    obs = example_observations(policy, 3)
    eager = []
    for graph in (False, True):
        policy.planner.config.cuda_graph = graph
        policy.planner.graphs.clear()
        acts = []
        for _ in range(3):
            policy.reset(seed=[3, 4, 5])
            acts.append(policy.act(obs))
        if not graph:
            eager = acts
    for a, b in zip(acts, eager):
        assert abs(a - b).max() < 1e-4
    assert len(policy.planner.graphs.graphs) == 1 and not policy.planner.graphs.disabled
    assert not [w for w in recwarn.list if "cuda_graph" in str(w.message)]


# ---------------------------------------------------------------- the U-Net's CPU batch path
@pytest.mark.parametrize("batch", [2, 3])
def test_native_conv_batches_match_the_onednn_path(batch, monkeypatch):
    torch.manual_seed(0)
    net = TemporalUNet(6, dim=8, dim_mults=(1, 2, 4)).eval()
    x, t = torch.randn(batch, 16, 6), torch.rand(batch)
    assert batch in unet.NATIVE_CONV_BATCHES and 8 * 16 <= unet.NATIVE_CONV_MAX_SIZE
    with torch.no_grad():
        native = net(x, t)
        assert torch.backends.mkldnn.is_available() == torch._C._get_mkldnn_enabled()  # restored
        monkeypatch.setattr(unet, "NATIVE_CONV_BATCHES", frozenset())
        onednn = net(x, t)
        rows = torch.cat([net(x[i:i + 1], t[i:i + 1]) for i in range(batch)])
    torch.testing.assert_close(native, onednn, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(native, rows, rtol=1e-5, atol=1e-5)


def test_native_conv_path_restores_the_backend_flag_on_error():
    net = TemporalUNet(6, dim=8, dim_mults=(1, 2, 4)).eval()
    before = torch._C._get_mkldnn_enabled()
    with pytest.raises(ValueError, match="not a multiple"):
        net(torch.randn(2, 15, 6), torch.rand(2))
    assert torch._C._get_mkldnn_enabled() == before


@pytest.mark.parametrize("batch, horizon, native", [(2, 16, True), (3, 16, True), (1, 16, False), (4, 16, False),
                                                    (2, 512, False)])
def test_native_conv_path_is_chosen_by_batch_and_size(batch, horizon, native):
    net = TemporalUNet(6, dim=8, dim_mults=(1, 2, 4)).eval()  # dim * H = 128, or 4096 at H=512
    seen = []
    net.final_conv.register_forward_pre_hook(lambda m, a: seen.append(torch._C._get_mkldnn_enabled()))
    with torch.no_grad():
        net(torch.randn(batch, horizon, 6), torch.rand(batch))
    assert seen == [not native]


def test_static_buffers_take_inputs_inside_and_outside_inference_mode():
    planner = graph_planner(NoisyPolicy())
    with torch.inference_mode():
        planner.act(torch.zeros(1, 2))
    planner.reset()
    planner.act(torch.ones(1, 2))  # copies into the buffers made under inference mode
    assert planner.graphs.backend.replays == 2


# ------------------------------------------------------------------ capturable without a GPU
# A CUDA-graph capture refuses host-to-device copies. Run on the meta device, a plan or a training
# update shows them: a CPU tensor copied to the device, or a Python scalar assigned through index
# tensors (CUDA stages it on the host; the H200 run of 2026-12-04 failed on one in Constraints).


class HostCopies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits, self._scalars = [], {}  # id -> tensor: kept alive, so a freed one's id is not reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if "scalar_tensor" in name:
            self._scalars[id(out)] = out
        elif "index_put" in name and len(args) > 2 and id(args[2]) in self._scalars:
            self.hits.append(f"a Python scalar assigned through index tensors ({name})")
        elif name.startswith(("aten._to_copy", "aten.copy_")) and any(
                isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args) and out.device.type != "cpu":
            self.hits.append(f"a CPU tensor copied to the device ({name})")
        return out


def test_the_host_copy_detector_sees_what_a_capture_refuses():
    mask = torch.zeros(4, 3, dtype=torch.bool, device="meta")
    with HostCopies() as h:
        mask[torch.zeros(2, dtype=torch.long, device="meta")] = True
        mask[0, 1:] = True  # a slice takes fill_: fine
        torch.ones(3).to("meta")
    assert len(h.hits) == 2 and "Python scalar" in h.hits[0] and "CPU tensor" in h.hits[1]


@pytest.mark.parametrize("name", ["pointmaze-umaze/diffuser", "pointmaze-umaze/trajectory_diffuser",
                                  "walker2d-medium/diffuser"])
def test_plans_copy_nothing_from_the_host(name):
    policy = load_policy(ROOT / "checkpoints" / name, device="cpu").to("meta")
    obs = torch.zeros(2, policy.spec.obs_dim, device="meta")
    goal = torch.zeros(2, policy.spec.goal_dim, device="meta") if policy.spec.goal_dim else None
    noise = torch.zeros(2, *policy.plan_shape, device="meta")
    with HostCopies() as h:
        policy.plan(obs, goal, noise)
    assert h.hits == []


def test_the_diffuser_training_update_copies_nothing_from_the_host():
    policy = load_policy(ROOT / "checkpoints/hopper-medium/diffuser", device="cpu").to("meta")
    batch = {"x": torch.zeros(4, *policy.plan_shape, device="meta"), "value": torch.zeros(4, 1, device="meta")}
    with HostCopies() as h:
        loss, _ = policy.loss(batch)
        loss.backward()
    assert h.hits == []
