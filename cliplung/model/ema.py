"""Exponential moving average (EMA) of a model's weights; the paper evaluates the EMA model.

After every optimizer step ``θ_ema ← d·θ_ema + (1 − d)·θ`` for every trainable floating-point
parameter (``d = train.ema_decay``, 0.999 as published); persistent buffers (BatchNorm running
statistics, counters) are copied, constant buffers (prompt ids and the like) are not. The shadow is
fp32: training keeps fp32 weights (bf16 only inside autocast), and bf16 could not represent the
``(1 − d)``-sized steps of a 0.999 average anyway.

Training averages what inference needs, the image encoder and head (``ModelEMA(model.classifier)``):
the evaluated and exported model, without a copy of the frozen 25M-parameter token table.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

__all__ = ["ModelEMA"]


def _unwrap(model: Any) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class ModelEMA:
    """EMA shadow of ``model`` (a module, DeepSpeed engine or DDP wrapper).

    ``ema.module`` is the averaged model (eval mode, no gradients). ``state_dict()`` /
    ``load_state_dict()`` make it part of a training checkpoint.
    """

    def __init__(self, model: Any, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay: must be in [0, 1), got {decay!r}")
        self.updates = 0
        self.module = copy.deepcopy(_unwrap(model)).float().eval().requires_grad_(False)
        self._persistent_buffers = [
            name for name, _ in self.module.named_buffers() if name in self.module.state_dict()
        ]
        self._set_decay(decay)

    def _set_decay(self, decay: float) -> None:
        self.decay = float(decay)
        self._lerp = get_ema_multi_avg_fn(self.decay)  # one fused lerp over all parameters

    @torch.no_grad()
    def update(self, model: Any) -> None:
        """One EMA step towards ``model``'s current weights (no host synchronisation)."""
        source = _unwrap(model)
        params = dict(source.named_parameters())
        shadow, current = [], []
        for name, p in self.module.named_parameters():
            src = params[name]
            if p.is_floating_point() and src.requires_grad:  # frozen weights never move
                shadow.append(p)
                current.append(src.detach().to(device=p.device, dtype=p.dtype))
        if shadow:
            self._lerp(shadow, current, self.updates)
        buffers = dict(source.named_buffers())
        own = dict(self.module.named_buffers())
        for name in self._persistent_buffers:
            if name in buffers:
                own[name].copy_(buffers[name].detach())
        self.updates += 1

    @torch.no_grad()
    def all_finite(self) -> torch.Tensor:
        """A bool tensor on the shadow's device: every averaged parameter is finite."""
        flags = [torch.isfinite(p).all() for p in self.module.parameters() if p.is_floating_point()]
        return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._set_decay(float(state["decay"]))
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["module"])
