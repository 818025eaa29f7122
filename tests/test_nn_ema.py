"""EMA: the update rule against a hand computation, warm-up schedules, state and weight swapping."""
import pytest
import torch
from torch import nn

from diffplan.nn import EMA



class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.frozen = nn.Parameter(torch.tensor([5.0]), requires_grad=False)
        self.register_buffer("count", torch.tensor([0.0]))


def test_constant_decay_matches_a_hand_computation():
    m = Tiny()
    ema = EMA(m, decay=0.9)
    expected = torch.tensor([1.0, 2.0])
    for step in range(3):
        with torch.no_grad():
            m.w += 1.0
            m.count += 1
            m.frozen += 1
        ema.update()
        expected = 0.9 * expected + 0.1 * m.w.detach()
        torch.testing.assert_close(ema.shadow["w"], expected)
    assert ema.shadow["count"].item() == 3 and ema.shadow["frozen"].item() == 8  # copied, not averaged


def test_update_after_step_copies_weights_first():
    m = Tiny()
    ema = EMA(m, decay=0.9, update_after_step=2)
    with torch.no_grad():
        m.w.fill_(10.0)
    ema.update()
    ema.update()
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([10.0, 10.0]))
    with torch.no_grad():
        m.w.fill_(20.0)
    ema.update()
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([11.0, 11.0]))


def test_power_warmup_follows_diffusion_policy():
    ema = EMA(Tiny(), decay=0.9999, power=0.75)
    decays = []
    for _ in range(5):
        decays.append(ema.current_decay())
        ema.update()
    assert decays[:2] == [0.0, 0.0]
    assert decays[2:] == pytest.approx([1 - 2**-0.75, 1 - 3**-0.75, 1 - 4**-0.75])
    ema.step = 10**9
    assert ema.current_decay() == 0.9999


def test_state_dict_round_trip_copy_to_and_swapped():
    m = Tiny()
    ema = EMA(m, decay=0.5)
    with torch.no_grad():
        m.w.fill_(3.0)
    ema.update()  # shadow w = [2, 2.5]
    state = ema.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    other = EMA(Tiny(), decay=0.5)
    other.load_state_dict(state)
    assert other.step == 1 and torch.equal(other.shadow["w"], torch.tensor([2.0, 2.5]))
    with ema.swapped():
        assert torch.equal(m.w, torch.tensor([2.0, 2.5]))
    assert torch.equal(m.w, torch.tensor([3.0, 3.0]))
    target = Tiny()
    ema.copy_to(target)
    assert torch.equal(target.w, torch.tensor([2.0, 2.5]))
    with pytest.raises(KeyError):
        other.load_state_dict({"step": torch.tensor(0)})
