"""One worker's training step, without Ray: precision, the DeepSpeed engine, the step, loss monitoring.

The training loop (:mod:`cliplung.train.loop`) and ``cliplung bench gpu`` run this same code.

**Device.** The engine runs on the device the caller gives (Ray Train's
``ray.train.torch.get_device()``): on a GPU it is passed to ``deepspeed.initialize`` as
``args.device_rank`` (DeepSpeed would otherwise pick ``cuda:LOCAL_RANK``) and checked afterwards.

**Precision** (``train.precision``, :func:`resolve_precision`). Weights, gradients, the gradient
all-reduce and the optimizer are fp32 always; ``bf16`` runs the forward pass under DeepSpeed's
``torch_autocast`` in bfloat16 (matmuls and convolutions in bf16, losses and normalisations in
fp32), with no module marked for low-precision gradient communication. DeepSpeed then wraps no
mixed-precision optimizer around the torch one: ZeRO 0 steps the plain torch optimizer (fused
kernels on a GPU), ZeRO 1 and 2 partition it with ``DeepSpeedZeroOptimizer`` over fp32 partitions.
The optimizer starts from a fresh torch state (DeepSpeed's bf16/fp16 wrappers would take a real
step on zero gradients at construction), and the EMA averages the fp32 weights.

**No host synchronisation in the step** (:func:`train_step`): augmentation randomness is drawn on
the host and copied without blocking, the model's constants are buffers, and the loss parts go to
a :class:`LossMonitor` that all-reduces them on the device, copies them to pinned host memory
asynchronously and reads each step's values ``lag`` steps later, when they are long computed. Every
rank reads the same (all-reduced) values at the same step, so all ranks agree on when a run has
diverged without an extra collective.

**Divergence.** A non-finite loss (all-reduced, so any rank's) at global step ``g`` is reported by
the monitor as a :class:`Divergence` naming epoch, step, the loss parts and the learning rate; the
loop stops, records it in the run directory (:func:`divergence_file`), reports it without a
checkpoint and returns normally (Ray Train would otherwise retry from the last checkpoint and diverge
the same way), and the driver calls :func:`raise_if_diverged`.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cliplung.config import Config, ConfigError
from cliplung.data.augment import augment_batch
from cliplung.model.ema import ModelEMA
from cliplung.runs import DIVERGENCE_FILE

__all__ = [
    "DIVERGED_KEY",
    "DIVERGENCE_FILE",
    "DIVERGENCE_KEY",
    "LOSS_PARTS",
    "DivergedError",
    "Divergence",
    "Engine",
    "LossMonitor",
    "build_engine",
    "configure_kernels",
    "cosine_schedule",
    "deepspeed_config",
    "divergence_file",
    "ema_divergence",
    "loss_parts",
    "make_optimizer",
    "prebuild_deepspeed_ops",
    "raise_if_diverged",
    "read_divergence",
    "resolve_precision",
    "train_step",
]

LOSS_PARTS = ("loss", "ce", "ic", "ca", "ia")
"""What :class:`LossMonitor` tracks per step (the first two for ``model.method=ce``)."""
DIVERGED_KEY = "train/diverged"
"""Report key: 1.0 in the final report of a run that diverged (absent otherwise)."""
DIVERGENCE_KEY = "train/divergence"
"""Report key: the divergence message (a string) in that report."""
BF16_MIN_CAPABILITY = (8, 0)
"""CUDA compute capability from which bf16 runs natively (Ampere)."""


# --------------------------------------------------------------------------- precision, kernels


def gpu_has_bf16(device: torch.device) -> bool:
    """The GPU computes in bf16 natively (compute capability 8.0 or newer)."""
    return torch.cuda.get_device_capability(device) >= BF16_MIN_CAPABILITY


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` on ``device``: ``"bf16"`` or ``"fp32"``.

    ``auto`` is bf16 on a GPU that has it and fp32 elsewhere (CPU, pre-Ampere GPUs); an explicit
    ``bf16`` on a GPU without it is a :class:`ConfigError` (DeepSpeed would refuse it later)."""
    if precision == "fp32":
        return "fp32"
    has_bf16 = device.type == "cuda" and gpu_has_bf16(device)
    if precision == "auto":
        return "bf16" if has_bf16 else "fp32"
    if device.type == "cuda" and not has_bf16:
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(
            f"train.precision: bf16 needs compute capability >= 8.0 (Ampere), but {name} has "
            f"{major}.{minor}; use train.precision=fp32 (or auto, which picks fp32 there)"
        )
    return "bf16"


def configure_kernels(config: Config, device: torch.device) -> None:
    """cuDNN autotuning unless ``train.deterministic``; deterministic kernels if it is.

    Call before the first CUDA kernel (cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when it starts)."""
    if device.type != "cuda":
        return
    deterministic = config.train.deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic)


# --------------------------------------------------------------------------- engine


def deepspeed_config(config: Config, use_gpu: bool, precision: str | None = None) -> dict:
    """The DeepSpeed JSON config for a training config.

    ``precision``: the resolved precision (:func:`resolve_precision`); by default ``bf16`` for
    ``train.precision: bf16``, and for ``auto`` when ``use_gpu``."""
    t = config.train
    if precision is None:
        precision = "bf16" if t.precision == "bf16" or (t.precision == "auto" and use_gpu) else "fp32"
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage > 0 and t.grad_clip == 0:
        zero["compute_grad_norm"] = False  # the norm is only for clipping, and reading it syncs per step
    ds = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        # ZeRO 0: train_step clips with torch (DeepSpeed's clip copies its constants from the host).
        "gradient_clipping": t.grad_clip if t.zero_stage > 0 else 0.0,
        "zero_optimization": zero,
        # Weights stay fp32 (no DeepSpeed bf16/fp16 section): precision is autocast's business.
        "bf16": {"enabled": False},
        # Our optimizers are plain torch ones (SGD as published); ZeRO 1/2 partition them fine.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # The throughput timer's default synchronises the device twice per step.
        "timers": {"throughput": {"enabled": False}},
    }
    if precision == "bf16":
        # No "lower precision safe" modules: their gradients would be all-reduced in bf16.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return ds


def cosine_schedule(total_steps: int, warmup_steps: int):
    """lr multiplier: linear warm-up, then cosine decay to 0 over ``total_steps`` optimizer steps."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(
    config: Config, params: list[torch.nn.Parameter], device: torch.device
) -> torch.optim.Optimizer:
    """SGD (momentum, as published) or AdamW, with torch's fused kernels on every device: one launch
    for all parameters, and AdamW's step counters stay tensors (the per-parameter implementation
    reads each one back to the host every step)."""
    t = config.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)


@dataclass
class Engine:
    """What :func:`build_engine` returns."""

    engine: Any
    """The DeepSpeed engine (``engine.module`` is the model)."""
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: ModelEMA
    """EMA of the image encoder and head (what evaluation and the export use)."""
    precision: str
    device: torch.device


def build_engine(
    config: Config, model: torch.nn.Module, device: torch.device, opt_steps_per_epoch: int
) -> Engine:
    """Model on ``device``, torch optimizer and cosine schedule, ``deepspeed.initialize``, EMA.

    Needs an initialised default process group (Ray Train's, or one of the caller's)."""
    import deepspeed

    t = config.train
    precision = resolve_precision(t.precision, device)
    configure_kernels(config, device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, params, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(t.epochs * opt_steps_per_epoch, t.warmup_epochs * opt_steps_per_epoch)
    )
    # On a GPU, the device comes from the caller, not from DeepSpeed's LOCAL_RANK guess (Ray may pack
    # workers differently). The CPU accelerator has one device; its rank must stay the default.
    args = argparse.Namespace(device_rank=device.index or 0) if device.type == "cuda" else None
    engine, _, _, _ = deepspeed.initialize(
        args=args,
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, device.type == "cuda", precision),
    )
    if torch.device(engine.device) != device:
        raise RuntimeError(
            f"DeepSpeed placed the model on {engine.device}, but this worker's device is {device}"
        )
    if t.compile:
        engine.compile()
    ema = ModelEMA(engine.module.classifier, decay=t.ema_decay)
    return Engine(engine=engine, scheduler=scheduler, ema=ema, precision=precision, device=device)


def prebuild_deepspeed_ops() -> str:
    """Build now the op ``deepspeed.initialize`` would JIT-compile in the first run on this machine,
    and say what was done.

    On DeepSpeed's CPU accelerator that is its shared-memory communication op
    (``deepspeed.comm.torch.build_shm_op``, the very call ``deepspeed.initialize`` makes): about 25 s
    on 2 cores, once, cached in torch's extensions directory (``TORCH_EXTENSIONS_DIR``, default
    ``~/.cache/torch_extensions``) and found there by every later process. ``make setup`` calls this,
    so neither the first training run nor the first test pays for it. Where DeepSpeed's accelerator
    has no such op (a GPU's), nothing is built."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    accelerator = get_accelerator().device_name()
    if build_shm_op() is None:
        return f"DeepSpeed ({accelerator} accelerator): no op to build ahead"
    return f"DeepSpeed ({accelerator} accelerator): shared-memory communication op built"


# --------------------------------------------------------------------------- the step


def loss_parts(config: Config) -> tuple[str, ...]:
    """The loss parts a step reports: total and CE, plus IC, CA, IA for the prompt methods."""
    return LOSS_PARTS[:2] if config.model.method == "ce" else LOSS_PARTS


def train_step(
    run: Engine, batch: dict[str, torch.Tensor], gen: torch.Generator, config: Config, global_step: int
):
    """Augment, forward, backward, optimizer step (at an accumulation boundary), EMA update.

    ``batch`` holds ``patches``, ``label`` and ``attributes`` on the device; ``global_step`` counts
    micro-steps before this one. Returns the loss parts (:func:`loss_parts`, 0-dim device tensors)
    and the learning rate the step used; reads nothing back from the device."""
    t = config.train
    engine = run.engine
    lr = run.scheduler.get_last_lr()[0]
    images = augment_batch(batch["patches"].float(), gen, t.augment)
    out = engine(images, labels=batch["label"], attributes=batch["attributes"].float())
    loss = out["loss"]
    if t.debug_nan_at_step is not None and global_step + 1 == t.debug_nan_at_step:
        loss = loss * float("nan")  # debug-only divergence injection
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()  # this step() steps the optimizer
    if boundary and t.grad_clip > 0 and t.zero_stage == 0:
        # After backward's gradient all-reduce, before the step; no host synchronisation.
        params = [p for p in engine.module.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip, foreach=True)
    engine.step()
    if boundary:
        run.ema.update(engine.module.classifier)
    return [loss.detach(), *(out["parts"][p] for p in loss_parts(config)[1:])], lr


# --------------------------------------------------------------------------- loss monitoring


@dataclass(frozen=True)
class Divergence:
    """Where and how a run diverged."""

    epoch: int
    """0-based epoch."""
    step: int
    """1-based micro-step within the epoch."""
    global_step: int
    """1-based micro-step of the run."""
    lr: float
    values: dict[str, float]
    """The loss parts of that step (mean over workers), or the last step's for an EMA divergence."""
    what: str = "non-finite loss"

    def message(self, epochs: int) -> str:
        parts = " ".join(f"{k}={v:.6g}" for k, v in self.values.items())
        return (
            f"training diverged at epoch {self.epoch + 1}/{epochs}, step {self.step} of the epoch "
            f"(global step {self.global_step}): {self.what}; {parts}, lr={self.lr:.6g}. The run stops here "
            "without a checkpoint for this epoch and is not retried (it would diverge again from the "
            "last checkpoint): lower train.lr, set train.grad_clip, or check the data"
        )


class LossMonitor:
    """Per-step loss parts, averaged over the workers on the device and read on the host ``lag``
    steps later through pinned memory (see the module docstring); sums them for the epoch and
    notices the first non-finite step.

    ``record()`` once per step; ``flush()`` at the end of the epoch (it waits for the last steps);
    ``means()`` the epoch's mean of every part; ``divergence`` the first divergence seen, if any.
    """

    def __init__(self, device: torch.device, *, lag: int = 2, names: tuple[str, ...] = LOSS_PARTS):
        self.names = names
        self.device = device
        self.lag = max(0, lag)
        self._cuda = device.type == "cuda" and torch.cuda.is_available()
        slots = self.lag + 1
        self._host = torch.zeros((slots, len(names)), dtype=torch.float32, pin_memory=self._cuda)
        self._values = self._host.numpy()  # a view: reading it is not a torch call, and never blocks
        self._events = [torch.cuda.Event() for _ in range(slots)] if self._cuda else [None] * slots
        self._pending: collections.deque = collections.deque()
        self._next = 0
        self.divergence: Divergence | None = None
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._sums = np.zeros(len(self.names), dtype=np.float64)
        self._count = 0
        self.last: dict[str, float] = {}
        self.last_info: tuple[int, int, float] = (0, 0, float("nan"))

    def record(self, parts: list[torch.Tensor], *, step: int, global_step: int, lr: float) -> None:
        """This step's parts (0-dim device tensors); ``step``/``global_step`` are 1-based."""
        stats = torch.stack([p.detach().float() for p in parts])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)  # a sum: any rank's NaN reaches every rank
            stats = stats / dist.get_world_size()
        slot = self._next
        self._next = (self._next + 1) % len(self._events)
        self._host[slot].copy_(stats, non_blocking=True)
        if self._events[slot] is not None:
            self._events[slot].record()
        self._pending.append((slot, step, global_step, lr))
        if len(self._pending) > self.lag:
            self._read_oldest()

    def _read_oldest(self) -> None:
        slot, step, global_step, lr = self._pending.popleft()
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # recorded `lag` steps ago: normally long complete
        values = self._values[slot].astype(np.float64)
        self._sums += values
        self._count += 1
        self.last = dict(zip(self.names, values.tolist(), strict=True))
        self.last_info = (step, global_step, lr)
        if self.divergence is None and not np.isfinite(values).all():
            self.divergence = Divergence(self.epoch, step, global_step, lr, self.last)

    def flush(self) -> None:
        """Read every step still in flight (the end of an epoch: the host waits here, once)."""
        while self._pending:
            self._read_oldest()

    @property
    def steps(self) -> int:
        """Steps read so far this epoch."""
        return self._count

    def means(self) -> dict[str, float]:
        """The epoch's mean of each part over the steps read (all of them after :meth:`flush`)."""
        return {k: float(v) / max(1, self._count) for k, v in zip(self.names, self._sums, strict=True)}


def ema_divergence(ema: ModelEMA, monitor: LossMonitor) -> Divergence | None:
    """A :class:`Divergence` when the EMA weights are non-finite (checked once per epoch; the EMA
    is identical on every rank, so all ranks agree)."""
    if bool(ema.all_finite()):
        return None
    step, global_step, lr = monitor.last_info
    return Divergence(monitor.epoch, step, global_step, lr, monitor.last, what="non-finite EMA weights")


# --------------------------------------------------------------------------- driver side


class DivergedError(RuntimeError):
    """A training run stopped because its loss (or its EMA weights) became non-finite."""


def divergence_file(config: Config) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of the run's divergence record, ``<storage>/<name>/divergence.json``
    (:mod:`cliplung.runs`): written by the loop when the run diverges, removed when a run of that
    name starts. Ray Train's ``Result`` holds the metrics of the newest checkpoint only, and a
    diverged epoch has none."""
    from cliplung.runs import Run
    from cliplung.storage import parse_location

    run = Run.of(config)
    fs, _ = run.pyarrow()
    return fs, parse_location(run.path(DIVERGENCE_FILE)).path


def read_divergence(config: Config) -> dict[str, Any] | None:
    """The run's divergence record (``message``, ``epoch``, ``step``, ...), or None."""
    from cliplung.runs import Run, RunError

    try:
        return Run.of(config).read_json(DIVERGENCE_FILE)
    except (RunError, OSError):
        return None


def raise_if_diverged(config: Config, metrics: dict[str, Any] | None = None) -> None:
    """Raise :class:`DivergedError` with the loop's message when the run of ``config`` diverged (its
    divergence record exists) or ``metrics`` (a report, e.g. Tune's last result) marks a divergence.
    The driver calls it after ``TorchTrainer.fit()`` returns without error."""
    if metrics and metrics.get(DIVERGED_KEY):
        raise DivergedError(str(metrics.get(DIVERGENCE_KEY) or "training diverged (non-finite loss)"))
    record = read_divergence(config)
    if record is not None:
        raise DivergedError(str(record.get("message") or "training diverged (non-finite loss)"))
