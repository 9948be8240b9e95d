"""Checks that a training run can start on its hardware and resume from its checkpoint, before any
worker starts. Each raises :class:`cliplung.config.ConfigError` (``cliplung`` exits 2) with the field
or file, the problem and what to do.

* :func:`check_cuda`: ``train.gpus_per_worker > 0`` but CUDA is unusable where the check runs (no
  driver, a driver too old for this torch, no device); the message names the driver version and
  ``torch.version.cuda``.
* :func:`check_precision`: ``train.precision: bf16`` on a GPU without bf16 (pre-Ampere).
* :func:`check_resume`: the checkpoint to resume was written in a way this run cannot load (an older
  checkpoint format, another model, another ZeRO stage, or another world size under ZeRO 1/2).
  Precision never blocks a resume: weights and optimizer state are fp32 whatever ``precision`` is.
* :func:`preflight`: all of them.

:func:`probe_cuda` describes the CUDA of the process it runs in. The driver of a run on a cluster
usually has no GPU (a KubeRay head pod): there, run :func:`probe_cuda` where the workers will run (a
one-GPU Ray task) or skip the CUDA checks; the training worker repeats the precision check on its own
device (:func:`cliplung.train.step.resolve_precision`).

The several-GPUs-per-worker and several-workers-per-GPU rules are config rules
(:class:`cliplung.config.TrainConfig`), checked when the config is built.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cliplung.config import Config, ConfigError

__all__ = [
    "CHECKPOINT_FORMAT",
    "TRAIN_STATE_FILE",
    "CudaProbe",
    "check_cuda",
    "check_precision",
    "check_resume",
    "checkpoint_identity",
    "preflight",
    "probe_cuda",
]

CHECKPOINT_FORMAT = 2
"""Version of the training checkpoint layout (``train_state.json`` ``format``). 2: fp32 DeepSpeed
state without frozen parameters (or ``weights.pt`` when the optimizer state was left out), EMA of
the image encoder and head. 1 (no ``format`` key): DeepSpeed bf16 weights, whole-model EMA."""
TRAIN_STATE_FILE = "train_state.json"
"""The file of a checkpoint that :func:`check_resume` reads."""
MIN_DRIVER_FOR_CUDA = {13: 580, 12: 525, 11: 450}
"""Oldest NVIDIA driver branch (R5xx) that runs each CUDA major version (NVIDIA's compatibility table)."""


@dataclass(frozen=True)
class CudaProbe:
    """What this process sees of CUDA."""

    torch_version: str
    torch_cuda: str | None
    """``torch.version.cuda``: the CUDA this torch was built for (None: a CPU-only build)."""
    driver_version: str | None
    """The NVIDIA kernel driver's version (``/proc/driver/nvidia/version`` or ``nvidia-smi``)."""
    available: bool
    """``torch.cuda.is_available()``."""
    error: str | None = None
    """Why CUDA cannot start (``torch.cuda.init()``'s message), when it cannot."""
    devices: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    """``{"index", "name", "capability", "bf16"}`` per visible device."""


def _driver_version() -> str | None:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        for word in text.split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                return word
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.split()[0] if out.stdout.split() else None
    except (OSError, subprocess.SubprocessError):
        return None


def probe_cuda() -> CudaProbe:
    """Describe the CUDA this process can use (cheap; starts CUDA when it can)."""
    from cliplung.train.step import gpu_has_bf16

    error = None
    available = torch.cuda.is_available()
    if not available:
        try:
            torch.cuda.init()
            error = "torch sees no CUDA device"
        except Exception as exc:  # torch says why: no driver, driver too old, no device
            error = " ".join(str(exc).split())
    devices = []
    if available:
        for i in range(torch.cuda.device_count()):
            dev = torch.device("cuda", i)
            devices.append(
                {
                    "index": i,
                    "name": torch.cuda.get_device_name(dev),
                    "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))),
                    "bf16": gpu_has_bf16(dev),
                }
            )
    return CudaProbe(
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        driver_version=_driver_version(),
        available=available,
        error=error,
        devices=tuple(devices),
    )


def check_cuda(config: Config, probe: CudaProbe | None = None) -> None:
    """``train.gpus_per_worker > 0`` needs a usable CUDA (``probe``: :func:`probe_cuda` by default)."""
    gpus = config.train.gpus_per_worker
    if gpus <= 0:
        return
    probe = probe or probe_cuda()
    if probe.available and probe.devices:
        return
    driver = f"NVIDIA driver {probe.driver_version}" if probe.driver_version else "no NVIDIA driver found"
    if probe.torch_cuda is None:
        built = f"torch {probe.torch_version} is a CPU-only build"
    else:
        major = int(probe.torch_cuda.split(".")[0])
        need = MIN_DRIVER_FOR_CUDA.get(major)
        built = f"torch {probe.torch_version} is built for CUDA {probe.torch_cuda}" + (
            f" (needs driver R{need} or newer)" if need else ""
        )
    raise ConfigError(
        f"train.gpus_per_worker: {gpus:g} GPU(s) per worker asked, but CUDA is unusable here: "
        f"{probe.error or 'no device'}; {driver}, {built}. Install a matching driver or torch build, "
        "or train on CPU with train.gpus_per_worker=0"
    )


def check_precision(config: Config, probe: CudaProbe | None = None) -> None:
    """``train.precision: bf16`` on GPUs needs bf16 on every visible GPU (``auto`` falls back to fp32)."""
    t = config.train
    if t.precision != "bf16" or t.gpus_per_worker <= 0:
        return
    probe = probe or probe_cuda()
    lacking = [d for d in probe.devices if not d["bf16"]]
    if lacking:
        d = lacking[0]
        raise ConfigError(
            f"train.precision: bf16 needs compute capability >= 8.0 (Ampere), but GPU {d['index']} "
            f"({d['name']}) has {d['capability']}; use train.precision=fp32 (or auto, which picks fp32 there)"
        )


ARCHITECTURE_FIELDS = (
    "method",
    "image_encoder",
    "image_width",
    "feature_channels",
    "n_ctx",
    "meta_hidden",
    "text_model",
    "text_trainable",
)
"""``model`` fields that decide the parameters and which of them train (the optimizer's groups): a
checkpoint loads only into the same values. Loss weights, prompts' wording and initialisers may change."""


def checkpoint_identity(config: Config, world_size: int, precision: str) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it (merged into ``train_state.json``)."""
    model = {k: getattr(config.model, k) for k in ARCHITECTURE_FIELDS}
    return {
        "format": CHECKPOINT_FORMAT,
        "zero_stage": config.train.zero_stage,
        "world_size": world_size,
        "precision": precision,
        "model": model,
        "patch_size": config.prepare.patch_size,
        "task": config.data.task,
    }


def check_resume(
    config: Config,
    train_state: dict[str, Any],
    *,
    world_size: int | None = None,
    checkpoint: str = "checkpoint",
) -> None:
    """The run of ``config`` (``world_size`` workers, default ``train.workers``) can load the
    checkpoint whose ``train_state.json`` is ``train_state``; ``checkpoint`` names it in errors."""
    world_size = world_size or config.train.workers
    fmt = train_state.get("format", 1)
    if fmt != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"{checkpoint}: written by a cliplung with checkpoint format {fmt}, this one reads format "
            f"{CHECKPOINT_FORMAT} (fp32 weights, EMA of the image encoder and head); it cannot be resumed: "
            "train under a new name (its model.pt still evaluates and predicts)"
        )
    saved = checkpoint_identity(config, world_size, train_state.get("precision", "fp32"))
    model = train_state.get("model", {})
    changed = [k for k in saved["model"] if model.get(k) != saved["model"][k]]
    if changed:
        k = changed[0]
        raise ConfigError(
            f"model.{k}: the run resumes {checkpoint}, whose model has {k}={model.get(k)!r}, but this config "
            f"says {saved['model'][k]!r}; set model.{k}={model.get(k)!r} to resume, or train under a new name"
        )
    for key, field_name in (("patch_size", "prepare.patch_size"), ("task", "data.task")):
        if train_state.get(key) != saved[key]:
            raise ConfigError(
                f"{field_name}: {checkpoint} was trained with {train_state.get(key)!r}, this config says "
                f"{saved[key]!r}; resume with the checkpoint's value or train under a new name"
            )
    if not train_state.get("optimizer_state", True):
        return  # weights only: any ZeRO stage and world size can start from them
    stage, zero = train_state.get("zero_stage"), config.train.zero_stage
    if stage != zero:
        raise ConfigError(
            f"train.zero_stage: {checkpoint} holds ZeRO stage {stage} optimizer state, this run uses stage "
            f"{zero}, whose files differ; set train.zero_stage={stage} to resume"
        )
    if zero > 0 and train_state.get("world_size") != world_size:
        raise ConfigError(
            f"train.workers: {checkpoint} holds ZeRO {zero} optimizer state partitioned over "
            f"{train_state.get('world_size')} workers, this run has {world_size}; set "
            f"train.workers={train_state.get('world_size')} to resume (ZeRO 0 checkpoints resume at any "
            "worker count)"
        )


def preflight(
    config: Config,
    *,
    train_state: dict[str, Any] | None = None,
    checkpoint: str = "checkpoint",
    probe: CudaProbe | None = None,
) -> None:
    """Every check of this module for a run of ``config`` (``train_state``: the checkpoint it will
    resume, if any). ``probe``: what the workers' machines see (:func:`probe_cuda` here by default)."""
    if config.train.gpus_per_worker > 0:
        probe = probe or probe_cuda()
        check_cuda(config, probe)
        check_precision(config, probe)
    if train_state is not None:
        check_resume(config, train_state, checkpoint=checkpoint)
