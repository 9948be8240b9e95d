"""What a Ray Train worker's data path alone can feed: the ``null`` model.

:func:`run_null` starts a real ``TorchTrainer`` whose workers get their input exactly as training
does (the driver's :func:`~cliplung.data.ingest.build_data_plan`, then
:meth:`~cliplung.data.ingest.DataPlan.for_worker` and ``train_batches`` per epoch, epoch 1
included) and whose step is what the training step does with a batch before the model: convert
the float16 patches on the device and augment them (:func:`null_step`). Nothing else runs, so the
samples/s are the most the data path can feed a model, and the data-wait share is the share of an
epoch spent waiting for the next batch, measured like the training loop measures it.

Used by ``cliplung bench train --model null``, ``cliplung bench ingest`` and ``cliplung bench gpu``.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from cliplung.config import Config
from cliplung.data.augment import augment_batch, epoch_generator

__all__ = ["null_loop_per_worker", "null_step", "run_null"]


def null_step(batch: dict[str, torch.Tensor], gen: torch.Generator, config: Config, acc: torch.Tensor):
    """The training step's handling of ``batch`` without the model (no host synchronisation)."""
    images = augment_batch(batch["patches"].float(), gen, config.train.augment)
    acc += images.sum() + batch["attributes"].float().sum() + batch["label"].sum()


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
    data = loop_config["data"].for_worker(rank, world, device)
    micro = config.train.micro_batch_size
    acc = torch.zeros((), device=device)
    epochs = []
    for epoch in range(config.train.epochs):
        gen = epoch_generator(config.train.seed, epoch, rank)
        n, waited = 0, 0.0
        start = time.perf_counter()
        batches = data.train_batches(epoch, micro)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - t0
            if batch is None:
                break
            null_step(batch, gen, config, acc)
            n += micro
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epochs.append((n, time.perf_counter() - start, waited))
    acc.item()
    if dist.is_initialized() and world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, epochs)
    else:
        parts = [epochs]
    rows = []
    for e in range(len(epochs)):
        samples = sum(p[e][0] for p in parts)
        seconds = max(p[e][1] for p in parts)
        wait = max(p[e][2] / max(p[e][1], 1e-9) for p in parts)
        rows.append({"samples": samples, "seconds": seconds, "data_wait_share": wait})
    # Ray Train keeps the metrics of reports that carry a checkpoint: rank 0 attaches an empty one.
    with tempfile.TemporaryDirectory(prefix="cliplung-null-report-") as tmp:
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report({"epochs": rows}, checkpoint=checkpoint)


def run_null(config: Config, *, use_gpu: bool = False, mode: str | None = None) -> dict:
    """Run the null model for ``config`` (its store, workers, epochs, ``data.*``) on Ray and return
    per-epoch samples/s and data-wait share, plus the medians of epochs 2.. (steady state) and the
    driver's one-time set-up (opening the store, the memory mode's read into the object store)."""
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
            train_loop_config={"config": config.to_dict(), "data": plan},
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
    epochs = [
        {
            "epoch": i + 1,
            "samples_per_s": round(e["samples"] / max(e["seconds"], 1e-9), 1),
            "data_wait_share": round(e["data_wait_share"], 4),
            "seconds": round(e["seconds"], 3),
        }
        for i, e in enumerate(result.metrics["epochs"])
    ]
    steady = epochs[1:] or epochs
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
    }
