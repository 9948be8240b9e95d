"""Exponential moving average (EMA) of a model's weights; the paper evaluates the EMA model.

After every optimizer step ``θ_ema ← d·θ_ema + (1 − d)·θ`` for every trainable floating-point
parameter (``d = train.ema_decay``, 0.999 as published); buffers (BatchNorm running statistics, counters) are
copied. The shadow is an fp32 copy even when the trained model runs in bf16, because bf16 cannot
represent the ``(1 − d)``-sized steps of a 0.999 average.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEMA"]


def _unwrap(model: Any) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class ModelEMA:
    """EMA shadow of ``model`` (a module, DeepSpeed engine or DDP wrapper).

    ``ema.module`` is the averaged model (eval mode, no gradients): ``ema.module.predict(x)``.
    ``state_dict()`` / ``load_state_dict()`` make it part of a training checkpoint.
    """

    def __init__(self, model: Any, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay: must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(_unwrap(model)).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: Any) -> None:
        """One EMA step towards ``model``'s current weights."""
        source = _unwrap(model)
        params = dict(source.named_parameters())
        shadow, current = [], []
        for name, p in self.module.named_parameters():
            src = params[name]
            if p.is_floating_point() and src.requires_grad:  # frozen weights never move
                shadow.append(p)
                current.append(src.detach().to(device=p.device, dtype=p.dtype))
        if shadow:
            torch._foreach_lerp_(shadow, current, 1.0 - self.decay)
        buffers = dict(source.named_buffers())
        for name, b in self.module.named_buffers():
            if name in buffers:
                b.copy_(buffers[name].detach())
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["module"])
