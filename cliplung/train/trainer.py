"""The driver side of training: :func:`train`, the one entry point every training run goes through.

``cliplung train``, ``jobs/train.py``, each fold of ``cliplung cv`` / ``compare`` and each trial of
``cliplung tune`` call :func:`train`. It is the only code that opens the store for training,
computes the splits, records the run (:mod:`cliplung.runs`) and builds the ``TorchTrainer``:

1. open and validate the store, compute the patient-level splits (before Ray starts: bad input
   fails in seconds, naming the store or field);
2. take the run's lease and record the run, or check that this start continues the recorded run
   (same store, same defining config);
3. if the run already finished all its epochs, return its summary without starting workers;
4. start or join Ray, check the run can be placed on the cluster, plan the data (in memory mode:
   the rows into Ray's object store, :func:`~cliplung.data.ingest.build_data_plan`), build the
   ``TorchTrainer`` (with the caller's Train callbacks, e.g. Tune's ``TuneReportCallback``), fit.

A run is identified by ``(storage.path, name)``: running again with the same pair resumes from the
newest complete checkpoint (Ray Train V2 restores its checkpoint manager from the run directory;
a checkpoint is registered only after every worker's upload finished).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from cliplung.cluster import PlacementWatch, check_placement, ensure_ray, is_embedded
from cliplung.config import Config
from cliplung.data.ingest import DataPlan, Splits, build_data_plan, open_training_store
from cliplung.runs import CheckpointInfo, Run, best_of
from cliplung.storage import check_endpoint, is_s3
from cliplung.train.early_stopping import stopped_early
from cliplung.train.preflight import check_cuda, check_precision, check_resume, probe_cuda
from cliplung.train.step import raise_if_diverged

__all__ = ["TrainSummary", "build_trainer", "steps_per_epoch", "train"]


def steps_per_epoch(config: Config, splits: Splits) -> int:
    """Micro-batches each worker runs per epoch (every worker the same count: fixed shards)."""
    t = config.train
    return (len(splits.train) // t.workers) // t.micro_batch_size


def _train_loop(loop_config: dict) -> None:
    """Each worker's entry point: :func:`cliplung.train.loop.train_loop_per_worker`, imported on the
    worker. Ray pickles this function by reference to this module, so a process that only builds
    and runs the ``TorchTrainer`` (a driver, a Tune trial's actor) never imports the model, its
    text tower (open_clip) or DeepSpeed; only the workers that train do."""
    from cliplung.train.loop import train_loop_per_worker

    train_loop_per_worker(loop_config)


def build_trainer(
    config: Config, data: DataPlan, steps: int, callbacks: Sequence[ray.train.UserCallback] = ()
) -> TorchTrainer:
    """A ``TorchTrainer`` for ``config`` whose workers read ``data``."""
    t = config.train
    use_gpu = t.gpus_per_worker > 0
    resources: dict[str, float] = {"CPU": t.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = t.gpus_per_worker
    run = Run.of(config)
    fs, path = run.pyarrow()
    return TorchTrainer(
        train_loop_per_worker=_train_loop,
        train_loop_config={"config": config.to_dict(), "steps_per_epoch": steps, "data": data},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=t.keep_checkpoints,
                checkpoint_score_attribute=t.checkpoint_metric,
                checkpoint_score_order=t.checkpoint_mode,
            ),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=list(callbacks),
        ),
    )


@dataclass
class TrainSummary:
    """What a finished run left behind."""

    name: str
    run_dir: str
    checkpoint: str | None
    best_checkpoint: str | None
    metrics: dict = field(default_factory=dict)
    splits: dict = field(default_factory=dict)
    already_complete: bool = False
    """True when the run had finished all its epochs before this call (nothing was trained)."""

    @property
    def epochs_done(self) -> int:
        return int(self.metrics.get("epoch", -1)) + 1

    def format(self) -> str:
        keys = ("train/loss", "val/accuracy", "val/macro_f1", "val/auc")
        shown = ", ".join(f"{k}={self.metrics[k]:.4f}" for k in keys if k in self.metrics)
        if "epoch" in self.metrics:
            shown = f"epochs done={self.epochs_done}, {shown}"
        return "\n".join(
            [
                f"run {self.name}: {shown}",
                f"  run directory:     {self.run_dir}",
                f"  latest checkpoint: {self.checkpoint}",
                f"  best checkpoint:   {self.best_checkpoint}",
                f"  inference export:  {self.checkpoint}/model.pt" if self.checkpoint else "",
            ]
        ).rstrip()


def _summary(config: Config, run: Run, splits: Splits, *, already_complete: bool) -> TrainSummary:
    found = run.checkpoints()
    latest: CheckpointInfo | None = found[-1] if found else None
    best = best_of(found, config.train.checkpoint_metric, config.train.checkpoint_mode)
    return TrainSummary(
        name=config.name,
        run_dir=run.location,
        checkpoint=latest.location if latest else None,
        best_checkpoint=best.location if best else None,
        metrics=dict(latest.metrics) if latest else {},
        splits=splits.summary(),
        already_complete=already_complete,
    )


def train(
    config: Config,
    *,
    address: str | None = None,
    callbacks: Sequence[ray.train.UserCallback] = (),
    lease: bool = True,
    shared_data=None,
) -> TrainSummary:
    """Train ``config`` on the Ray cluster at ``address`` (embedded when None); resume if possible.

    ``callbacks`` are Ray Train callbacks added to the run (a Tune trial passes
    ``TuneReportCallback``). ``lease=False`` skips the run's lease: for runs inside a search, whose
    driver holds the lease of the whole search directory. ``shared_data``: a
    :class:`cliplung.data.shared.SharedSplitData` already read for this run's split (``compare``
    shares one per fold among its methods); refused when it was read for another split.
    """
    t = config.train
    store, splits = open_training_store(config)
    if is_s3(config.storage.path):
        check_endpoint(config.storage.endpoint)
    run = Run.of(config)
    holding = run.lease(purpose=f"cliplung train {config.name}") if lease else contextlib.nullcontext()
    with holding:
        run.start(config, kind="train", store=store, splits=splits.record(config.data.store))
        latest = run.latest_checkpoint()
        stopped = stopped_early(latest.location, config.storage.endpoint) if latest is not None else None
        if latest is not None and latest.epoch is not None and (latest.epoch + 1 >= t.epochs or stopped):
            done = f"{latest.epoch + 1} of {t.epochs} epochs done"
            print(
                f"run {config.name} is complete ({'stopped early, ' if stopped else ''}{done}, "
                f"{latest.location}): nothing to train",
                flush=True,
            )
            return _summary(config, run, splits, already_complete=True)
        if latest is not None:
            check_resume(
                config, run.checkpoint_state(latest), world_size=t.workers, checkpoint=latest.location
            )
        ensure_ray(address, num_cpus=os.cpu_count() or 1)
        if t.gpus_per_worker > 0 and is_embedded():
            # The driver runs on the cluster's only node: its CUDA is the workers' CUDA. (On a
            # cluster the driver rarely has a GPU; each worker checks its own device.)
            probe = probe_cuda()
            check_cuda(config, probe)
            check_precision(config, probe)
        check_placement(config)
        data = build_data_plan(config, store, splits, shared=shared_data)
        trainer = build_trainer(config, data, steps_per_epoch(config, splits), callbacks)
        with PlacementWatch(config):
            result = trainer.fit()
        if result.error:
            raise result.error
        raise_if_diverged(config)
        return _summary(config, run, splits, already_complete=False)
