"""Exponential moving average of a model's weights (Polyak averaging).

``EMA(model, decay=0.995)`` is Diffuser's setting (Janner et al.): a constant decay, with the
weights copied instead while fewer than ``update_after_step`` updates have been made.
``EMA(model, decay=0.9999, power=0.75)`` is Diffusion Policy's warm-up schedule (Chi et al.,
``EMAModel.get_decay``): with ``s = max(0, n - update_after_step - 1)`` for the ``n``-th update
(counting from 0), the decay is ``0`` (copy) while ``s == 0`` and otherwise
``clamp(1 - (1 + s / inv_gamma) ** -power, min_decay, decay)``.

``update()`` is one fused ``torch._foreach_lerp_`` over all trainable floating-point parameters
(``ema += (1 - decay) * (param - ema)``), plus one ``_foreach_copy_`` for frozen parameters and
buffers: no per-parameter Python math. Create the EMA after moving the model to its device (or
call ``ema.to(device)``).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.995, power: float | None = None, inv_gamma: float = 1.0,
                 min_decay: float = 0.0, update_after_step: int = 0):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.model = model
        self.decay, self.power, self.inv_gamma = decay, power, inv_gamma
        self.min_decay, self.update_after_step = min_decay, update_after_step
        self.step = 0  # number of update() calls so far
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        params = dict(model.named_parameters())
        self._avg = [k for k in self.shadow if k in params and params[k].requires_grad and params[k].is_floating_point()]
        self._copy = [k for k in self.shadow if k not in set(self._avg)]

    def current_decay(self) -> float:
        """The decay the next ``update()`` uses (0 means: copy the weights)."""
        if self.power is None:
            return 0.0 if self.step < self.update_after_step else self.decay
        s = max(0, self.step - self.update_after_step - 1)
        if s == 0:
            return 0.0
        return max(self.min_decay, min(1.0 - (1.0 + s / self.inv_gamma) ** -self.power, self.decay))

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        live = self.model.state_dict(keep_vars=True)
        torch._foreach_lerp_([self.shadow[k] for k in self._avg], [live[k].detach() for k in self._avg], 1.0 - decay)
        if self._copy:
            torch._foreach_copy_([self.shadow[k] for k in self._copy], [live[k].detach() for k in self._copy])
        self.step += 1

    def to(self, *args, **kwargs) -> EMA:
        self.shadow = {k: v.to(*args, **kwargs) for k, v in self.shadow.items()}
        return self

    # --- state and weights -------------------------------------------------------------------
    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, loadable with ``model.load_state_dict``."""
        return dict(self.shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat dict of tensors (safetensors-ready): ``shadow.<name>`` entries plus ``step``."""
        out = {f"shadow.{k}": v for k, v in self.shadow.items()}
        out["step"] = torch.tensor(self.step, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self.shadow if f"shadow.{k}" not in state]
        if missing:
            raise KeyError(f"EMA state is missing {len(missing)} tensors, e.g. {missing[:3]}")
        with torch.no_grad():
            for k, v in self.shadow.items():
                v.copy_(state[f"shadow.{k}"])
        self.step = int(state["step"])

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the averaged weights into ``model`` (default: the tracked model)."""
        (model if model is not None else self.model).load_state_dict(self.shadow)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module | None = None):
        """``with ema.swapped(): ...`` runs with the averaged weights, then restores the live ones."""
        model = model if model is not None else self.model
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(backup)
