"""Count the calls that make the host wait for a GPU, on any device (a CPU, a fake CUDA device).

On a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` reports synchronising operations as they
happen. Elsewhere :class:`HostSyncCounter` (a ``TorchFunctionMode``) counts the calls that would
synchronise if the tensors involved lived on a GPU:

* **reads**: a tensor's value taken into Python (``item``, ``float()``, ``int()``, ``bool()``,
  ``tolist``, ``numpy``): the host waits until the value is computed;
* **blocking copies**: ``to`` / ``cuda`` / ``cpu`` / ``copy_`` between devices without
  ``non_blocking=True`` (a copy from pageable memory waits as well; non-blocking copies are trusted
  to come from pinned memory, which :func:`cliplung.data.augment.to_device` ensures on a real GPU);
* **host data**: a tensor built from Python numbers straight onto a non-CPU device
  (``torch.tensor(..., device="cuda")``), a blocking host-to-device copy.

On the CPU path every tensor is a host tensor, so device-changing copies do not occur there: the
reads are what the CPU path can count. Under ``FakeTensorMode`` with tensors on a fake ``cuda``
device, the copies show as well, and ``fake_reads=True`` answers reads with zeros (a fake tensor has
no value) so the code under test runs on.
"""

from __future__ import annotations

import collections
import traceback
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostSyncCounter"]

_READS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"}
_COPIES = {"to", "cuda", "cpu", "copy_"}
_FROM_HOST_DATA = {"tensor", "as_tensor"}


def _device_of(value: Any) -> torch.device | None:
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError:
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    if isinstance(value, torch.Tensor):
        return value.device
    return None


def _copy_target(
    name: str, args: tuple, kwargs: dict
) -> tuple[torch.device | None, torch.device | None, bool]:
    """(source device, target device, non_blocking) of a copy call; target None: no device change."""
    if name == "copy_":
        dst, src = args[0], args[1]
        non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
        return src.device, dst.device, non_blocking
    src = args[0]
    if name == "cpu":
        return src.device, torch.device("cpu"), False
    non_blocking = bool(kwargs.get("non_blocking", False))
    if name == "cuda":
        return (
            src.device,
            _device_of(kwargs.get("device", args[1] if len(args) > 1 else "cuda")),
            non_blocking,
        )
    target = _device_of(kwargs["device"]) if "device" in kwargs else None
    for a in args[1:]:
        if isinstance(a, bool):
            non_blocking = non_blocking or a
        elif target is None and not isinstance(a, torch.dtype):
            target = _device_of(a)
    return src.device, target, non_blocking


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as c: step()`` then ``c.total``, ``c.by_kind``, ``c.sites``."""

    def __init__(self, *, fake_reads: bool = False, keep_sites: int = 20):
        super().__init__()
        self.fake_reads = fake_reads
        self.keep_sites = keep_sites
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.sites: list[str] = []

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def _record(self, kind: str) -> None:
        self.by_kind[kind] += 1
        if len(self.sites) < self.keep_sites:
            frames = [f for f in traceback.extract_stack()[:-3] if "/torch/" not in f.filename]
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            self.sites.append(f"{kind} at {where}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _READS and args and isinstance(args[0], torch.Tensor):
            self._record(f"read ({name})")
            if self.fake_reads:
                return _zero_value(name, args[0])
        elif name in _COPIES and args and isinstance(args[0], torch.Tensor):
            src, dst, non_blocking = _copy_target(name, args, kwargs)
            if dst is not None and src is not None and not _same_device(src, dst) and not non_blocking:
                self._record(f"blocking copy ({src.type} to {dst.type})")
        elif name in _FROM_HOST_DATA and args and not isinstance(args[0], torch.Tensor):
            device = _device_of(kwargs.get("device"))
            if device is not None and device.type != "cpu":
                self._record(f"host data to {device.type} ({name})")
        return func(*args, **kwargs)


def _zero_value(name: str, t: torch.Tensor) -> Any:
    """A stand-in for a fake tensor's value, built without torch (the fake mode is still active)."""
    if name in ("tolist", "numpy"):
        import numpy as np

        zeros = np.zeros(tuple(t.shape), dtype=np.float64 if t.is_floating_point() else np.int64)
        return zeros.tolist() if name == "tolist" else zeros
    if name == "__bool__" or (name == "item" and t.dtype == torch.bool):
        return False
    if name in ("__int__", "__index__") or (name == "item" and not t.is_floating_point()):
        return 0
    return 0.0
