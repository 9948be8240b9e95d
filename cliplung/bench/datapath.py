"""What a Ray Train worker's data path alone can feed: the ``null`` model.

:func:`run_null` starts a real ``TorchTrainer`` whose workers get their input exactly as training
does (the driver's :func:`~cliplung.data.ingest.build_data_plan`, then
:meth:`~cliplung.data.ingest.DataPlan.for_worker` and ``train_batches`` per epoch, epoch 1
included) and whose step is what the training step does with a batch before the model: convert
the float16 patches on the device and augment them (:func:`null_step`). Nothing else runs, so the
samples/s are the most the data path can feed a model, and the data-wait share is the share of an
epoch spent waiting for the next batch, measured like the training loop measures it.

``reference=True`` (``memory`` mode) also times, in the same worker and interleaved with the data
path epoch by epoch, the one-process in-memory ceiling on that worker's own shard
(:func:`in_memory_epoch`: the epoch's order gathered at once, then slices, in the loop's thread).
On a machine whose speed drifts by tens of percent within a minute, a ratio of two figures taken
minutes apart in different processes says little; the paired per-epoch ratio cancels the drift and
the worker process's own overheads.

Used by ``cliplung bench train --model null``, ``cliplung bench ingest`` and ``cliplung bench gpu``.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np
import torch

from cliplung.config import Config
from cliplung.data.augment import augment_batch, epoch_generator

__all__ = ["in_memory_epoch", "null_loop_per_worker", "null_step", "run_null"]


def null_step(batch: dict[str, torch.Tensor], gen: torch.Generator, config: Config, acc: torch.Tensor):
    """The training step's handling of ``batch`` without the model (no host synchronisation)."""
    images = augment_batch(batch["patches"].float(), gen, config.train.augment)
    acc += images.sum() + batch["attributes"].float().sum() + batch["label"].sum()


def in_memory_epoch(tensors: dict[str, torch.Tensor], order: torch.Tensor, micro: int):
    """The in-memory ceiling's batches: rows already in memory, the epoch's ``order`` gathered at
    once, then its micro-batches sliced (one process's fastest way, no thread)."""
    laid = {k: v.index_select(0, order) for k, v in tensors.items()}
    for start in range(0, len(order) - len(order) % micro, micro):
        yield {k: v[start : start + micro] for k, v in laid.items()}


def _timed_epoch(batches, gen: torch.Generator, config: Config, acc: torch.Tensor, micro: int):
    """(samples, seconds, seconds waited for batches) of consuming ``batches`` with :func:`null_step`."""
    n, waited = 0, 0.0
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - t0
        if batch is None:
            break
        null_step(batch, gen, config, acc)
        n += micro
    if acc.device.type == "cuda":
        torch.cuda.synchronize(acc.device)
    return n, time.perf_counter() - start, waited


def null_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from cliplung.config import config_from_dict

    config = config_from_dict(loop_config["config"])
    torch.set_num_threads(max(1, int(config.train.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    plan = loop_config["data"]
    data = plan.for_worker(rank, world, device)
    micro = config.train.micro_batch_size
    acc = torch.zeros((), device=device)
    reference = None
    if loop_config.get("reference") and plan.mode == "memory":
        from cliplung.data.augment import to_device
        from cliplung.data.ingest import shuffle_generator

        shard = ray.get(plan.refs[rank][0])
        reference = {k: to_device(torch.from_numpy(np.array(v)), device) for k, v in shard.items()}
    epochs = []
    for epoch in range(config.train.epochs):
        path_first = epoch % 2 == 0  # alternate which of the pair runs first
        timed = {}
        for which in ("path", "reference") if path_first else ("reference", "path"):
            gen = epoch_generator(config.train.seed, epoch, rank)
            if which == "path":
                timed[which] = _timed_epoch(data.train_batches(epoch, micro), gen, config, acc, micro)
            elif reference is not None:
                n = len(reference["label"])
                order = torch.randperm(n, generator=shuffle_generator(config.train.seed, epoch, rank))
                batches = in_memory_epoch(reference, to_device(order, device), micro)
                timed[which] = _timed_epoch(batches, gen, config, acc, micro)
        epochs.append((timed["path"], timed.get("reference")))
    acc.item()
    if dist.is_initialized() and world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, epochs)
    else:
        parts = [epochs]
    rows = []
    for e in range(len(epochs)):
        row = _aggregate([p[e][0] for p in parts])
        if epochs[e][1] is not None:
            ref = _aggregate([p[e][1] for p in parts])
            row["reference_samples"], row["reference_seconds"] = ref["samples"], ref["seconds"]
        rows.append(row)
    # Ray Train keeps the metrics of reports that carry a checkpoint: rank 0 attaches an empty one.
    with tempfile.TemporaryDirectory(prefix="cliplung-null-report-") as tmp:
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report({"epochs": rows}, checkpoint=checkpoint)


def _aggregate(per_rank: list[tuple[int, float, float]]) -> dict:
    """One epoch over all ranks: the samples of all, the slowest rank's seconds and wait share."""
    return {
        "samples": sum(r[0] for r in per_rank),
        "seconds": max(r[1] for r in per_rank),
        "data_wait_share": max(r[2] / max(r[1], 1e-9) for r in per_rank),
    }


def run_null(
    config: Config, *, use_gpu: bool = False, mode: str | None = None, reference: bool = False
) -> dict:
    """Run the null model for ``config`` (its store, workers, epochs, ``data.*``) on Ray and return
    per-epoch samples/s and data-wait share, plus the medians of epochs 2.. (steady state) and the
    driver's one-time set-up (opening the store, the memory mode's read into the object store).
    ``reference`` (``memory`` mode): also the in-worker ceiling's samples/s per epoch and the
    paired ratio of the path's rate to it (``over_reference``, same samples, so the ceiling's
    seconds over the path's), and their medians over epochs 2.."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cliplung.cluster import ensure_ray
    from cliplung.data.ingest import build_data_plan, open_training_store
    from cliplung.train.trainer import steps_per_epoch

    ensure_ray(num_cpus=None)
    started = time.perf_counter()
    store, splits = open_training_store(config)
    plan = build_data_plan(config, store, splits, mode=mode)
    setup_s = time.perf_counter() - started
    t = config.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if use_gpu else {})}
    with tempfile.TemporaryDirectory(prefix="cliplung-null-") as storage:
        trainer = TorchTrainer(
            train_loop_per_worker=null_loop_per_worker,
            train_loop_config={"config": config.to_dict(), "data": plan, "reference": reference},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=t.workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                name="null", storage_path=storage, failure_config=ray.train.FailureConfig(max_failures=0)
            ),
        )
        result = trainer.fit()
    if result.error:
        raise result.error
    epochs = []
    for i, e in enumerate(result.metrics["epochs"]):
        row = {
            "epoch": i + 1,
            "samples_per_s": round(e["samples"] / max(e["seconds"], 1e-9), 1),
            "data_wait_share": round(e["data_wait_share"], 4),
            "seconds": round(e["seconds"], 3),
        }
        if "reference_samples" in e:
            row["reference_samples_per_s"] = round(
                e["reference_samples"] / max(e["reference_seconds"], 1e-9), 1
            )
            row["over_reference"] = round(e["reference_seconds"] / max(e["seconds"], 1e-9), 3)
        epochs.append(row)
    steady = epochs[1:] or epochs
    paired = {}
    if "over_reference" in epochs[0]:
        paired = {
            "reference_samples_per_s": round(
                statistics.median(e["reference_samples_per_s"] for e in steady), 1
            ),
            "over_reference": round(statistics.median(e["over_reference"] for e in steady), 3),
        }
    return {
        "mode": plan.mode,
        "workers": t.workers,
        "rows": len(splits.train),
        "steps_per_epoch": steps_per_epoch(config, splits),
        "driver_setup_s": round(setup_s, 3),
        "epochs": epochs,
        "epoch1_samples_per_s": epochs[0]["samples_per_s"],
        "samples_per_s": round(statistics.median(e["samples_per_s"] for e in steady), 1),
        "data_wait_share": round(statistics.median(e["data_wait_share"] for e in steady), 4),
        **paired,
    }
