"""The driver side of training: Ray start-up, run storage, and the ``TorchTrainer``.

``train(config)`` is what ``cliplung train`` and ``jobs/train.py`` call. A run is identified by
``(storage.path, name)``: running again with the same pair resumes from the newest complete
checkpoint (Ray Train V2 restores its checkpoint manager from the run directory; a checkpoint is
registered only after every worker's upload finished, so a half-uploaded one is never "latest").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.data
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from cliplung.cluster import ensure_ray
from cliplung.config import Config, dump_config
from cliplung.data.ingest import DeterministicShards, Splits, build_datasets, open_training_store
from cliplung.storage import check_endpoint, is_s3, pyarrow_filesystem
from cliplung.train.loop import train_loop_per_worker
from cliplung.train.step import raise_if_diverged

__all__ = ["TrainSummary", "build_trainer", "run_storage", "train"]


def run_storage(config: Config) -> tuple[object, str]:
    """(pyarrow filesystem, path) of the run storage root; local paths are made absolute."""
    fs, path = pyarrow_filesystem(config.storage.path, endpoint=config.storage.endpoint)
    return fs, path


def build_trainer(config: Config, datasets: dict, steps_per_epoch: int) -> TorchTrainer:
    """A ``TorchTrainer`` for ``config`` over ``datasets`` (``train`` and ``val``)."""
    t = config.train
    use_gpu = t.gpus_per_worker > 0
    resources = {"CPU": t.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = t.gpus_per_worker
    fs, path = run_storage(config)
    return TorchTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "steps_per_epoch": steps_per_epoch},
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
        ),
        datasets=datasets,
        dataset_config=DeterministicShards(),
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

    def format(self) -> str:
        keys = ("train/loss", "val/accuracy", "val/macro_f1", "val/auc")
        shown = ", ".join(f"{k}={self.metrics[k]:.4f}" for k in keys if k in self.metrics)
        if "epoch" in self.metrics:
            shown = f"epochs done={int(self.metrics['epoch']) + 1}, {shown}"
        return "\n".join(
            [
                f"run {self.name}: {shown}",
                f"  run directory:     {self.run_dir}",
                f"  latest checkpoint: {self.checkpoint}",
                f"  best checkpoint:   {self.best_checkpoint}",
                f"  inference export:  {self.checkpoint}/model.pt" if self.checkpoint else "",
            ]
        ).rstrip()


def _write_run_manifest(config: Config, splits: Splits) -> None:
    """config.yaml and splits.json at the top of the run directory (first write wins on resume)."""
    fs, path = run_storage(config)
    run_dir = f"{path}/{config.name}"
    fs.create_dir(run_dir, recursive=True)
    manifest = {
        **splits.summary(),
        "store": config.data.store,
        "train_rows": splits.train.tolist(),
        "val_rows": splits.val.tolist(),
        "test_rows": splits.test.tolist(),
        "test_patients": list(splits.test_patients),
    }
    with fs.open_output_stream(f"{run_dir}/config.yaml") as f:
        f.write(dump_config(config).encode())
    with fs.open_output_stream(f"{run_dir}/splits.json") as f:
        f.write(json.dumps(manifest).encode())


def train(config: Config, address: str | None = None) -> TrainSummary:
    """Train ``config`` on the Ray cluster at ``address`` (embedded when None); resume if possible."""
    t = config.train
    store, splits = open_training_store(config)
    if is_s3(config.storage.path):
        check_endpoint(config.storage.endpoint)
    # Ray Data read tasks need CPUs beside the workers'; on a laptop, oversubscribe logically.
    ensure_ray(address, num_cpus=max(os.cpu_count() or 1, t.workers * t.cpus_per_worker + 2))
    datasets = build_datasets(config, store, splits)
    steps_per_epoch = (len(splits.train) // t.workers) // t.micro_batch_size
    _write_run_manifest(config, splits)
    result = build_trainer(config, datasets, steps_per_epoch).fit()
    if result.error:
        raise result.error
    raise_if_diverged(config)
    _, path = run_storage(config)
    best = None
    if result.best_checkpoints:
        ordered = sorted(
            result.best_checkpoints,
            key=lambda cm: cm[1].get(t.checkpoint_metric, float("nan")),
            reverse=t.checkpoint_mode == "max",
        )
        best = ordered[0][0].path
    return TrainSummary(
        name=config.name,
        run_dir=_display(config, f"{path}/{config.name}"),
        checkpoint=_display(config, result.checkpoint.path) if result.checkpoint else None,
        best_checkpoint=_display(config, best) if best else None,
        metrics=dict(result.metrics or {}),
        splits=splits.summary(),
    )


def _display(config: Config, path: str) -> str:
    return f"s3://{path}" if config.storage.path.startswith("s3://") else str(Path(path))
