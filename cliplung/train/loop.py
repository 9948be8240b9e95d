"""The per-worker training loop that Ray Train runs on every worker.

One loop for 1 CPU worker, 2 CPU workers (gloo) and N GPUs (nccl, one GPU per worker):

1. Rebuild the :class:`~cliplung.config.Config` from the loop config, seed, build the model.
2. Build the DeepSpeed engine on Ray Train's device (:func:`cliplung.train.step.build_engine`: ZeRO
   stage, fp32 weights with bf16 autocast or plain fp32, gradient accumulation and clipping; the
   optimizer and cosine schedule are torch objects handed to DeepSpeed, so SGD, as published, works as
   well as AdamW) and the EMA of the image encoder and head.
3. Resume from ``ray.train.get_checkpoint()`` when the run has one, after
   :func:`~cliplung.train.preflight.check_resume`: DeepSpeed state (model, optimizer, scheduler) or,
   in a checkpoint written without optimizer state, the weights and schedule; the EMA; the epoch and
   step counter. The data order and augmentation of an epoch are functions of (seed, epoch, rank),
   so nothing else is needed to replay an interrupted epoch exactly.
4. Each epoch: train on this worker's fixed shard (``train_loop_config["data"]``, a
   :class:`~cliplung.data.ingest.DataPlan`: in memory on the worker's device or streamed from the
   store, in an order drawn from (seed, epoch, rank); augmented on the worker; no host
   synchronisation in the step, see :mod:`cliplung.train.step`), evaluate the EMA model on the
   validation shard, gather predictions from all workers, compute the metrics, and report them
   with a checkpoint.
5. A non-finite loss or EMA ends the run at that step: a final report without checkpoint marks the
   divergence (``train/diverged``, ``train/divergence``) and the loop returns normally, so Ray Train
   does not retry it; the driver raises :class:`~cliplung.train.step.DivergedError`.

Checkpoint of epoch ``e`` (``epoch_NNNN/``): ``deepspeed/`` (fp32 model without the frozen parameters,
optimizer and scheduler; every ``train.optimizer_state_every``-th epoch and the last) or else
``weights.pt`` (trainable weights and schedule), ``model.pt`` (the EMA's inference export, whose
weights are the EMA's), ``ema.pt`` (the EMA's decay and update count),
``rng_rank*.pt``, ``config.yaml`` and ``train_state.json`` (epoch, step, metrics, what wrote it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.fs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from cliplung.config import Config, config_from_dict, dump_config
from cliplung.data.augment import epoch_generator
from cliplung.model import build_model, save_inference
from cliplung.train.early_stopping import EarlyStopping
from cliplung.train.metrics import classification_metrics
from cliplung.train.preflight import TRAIN_STATE_FILE, check_resume, checkpoint_identity
from cliplung.train.prometheus import WorkerMetrics
from cliplung.train.step import (
    DIVERGED_KEY,
    DIVERGENCE_FILE,
    DIVERGENCE_KEY,
    Divergence,
    Engine,
    LossMonitor,
    build_engine,
    cosine_schedule,
    deepspeed_config,
    ema_divergence,
    loss_parts,
    train_step,
)

__all__ = ["cosine_schedule", "deepspeed_config", "optimizer_state_due", "train_loop_per_worker"]

DEEPSPEED_TAG = "state"
WEIGHTS_FILE = "weights.pt"
RAY_TRAIN_POLL_VARIABLE = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
"""Ray Train V2's documented setting for how often its controller polls the workers (default 2 s)."""


def fault_delay_s() -> float:
    """How long the injected fault waits before it exits: 1.5 polls of Ray Train's controller
    (3 s at Ray's default 2 s; the suite polls every 0.25 s), so the last report has been
    collected."""
    return 1.5 * float(os.environ.get(RAY_TRAIN_POLL_VARIABLE, "2"))


def _say(line: str) -> None:
    """One line to the driver's console. Written to stdout directly: Ray Train V2 patches
    ``print`` on workers to also feed its structured log, and the driver then shows it twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fault_marker(config: Config) -> Path:
    """Where the injected fault remembers that it fired (the restarted worker must not fire again);
    keyed by run storage, name and step, and removed when the run finishes."""
    key = hashlib.sha256(
        f"{config.storage.path}|{config.name}|{config.train.debug_fail_at_step}".encode()
    ).hexdigest()
    return Path(tempfile.gettempdir()) / f"cliplung-fault-{key[:16]}"


def _maybe_inject_fault(config: Config, rank: int, global_step: int) -> None:
    """Debug-only: rank 0 kills its own process at ``train.debug_fail_at_step``, once per run name."""
    if config.train.debug_fail_at_step is None or rank != 0 or global_step != config.train.debug_fail_at_step:
        return
    marker = _fault_marker(config)
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    # Ray Train's controller collects reports by polling workers (every 2 s by default); a worker
    # that dies sooner takes its last report with it and the run restarts from the one before.
    # Waiting one poll makes the injected fault exercise "resume from the newest checkpoint".
    time.sleep(fault_delay_s())
    _say(f"[fault injection] rank 0 exits at step {global_step}")
    os._exit(1)


def _peak_memory_mb(device: torch.device) -> float:
    """Largest peak resident memory of any worker (GPU: peak allocated device memory), in MiB."""
    if device.type == "cuda":
        peak = float(torch.cuda.max_memory_allocated(device))
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([peak], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peak = float(t.item())
    return peak / 2**20


@torch.no_grad()
def _evaluate(model: torch.nn.Module, data, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels of this worker's validation shard (``model``: the EMA's
    image encoder and head, fp32), copied to the host once."""
    probs, labels = [], []
    for batch in data.val_batches(batch_size):
        probs.append(torch.softmax(model(batch["patches"].float()).float(), dim=1))
        labels.append(batch["label"])
    if not probs:
        return np.zeros((0, 0)), np.zeros((0,), dtype=np.int64)
    return torch.cat(probs).cpu().numpy(), torch.cat(labels).cpu().numpy()


def _gather(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return probs, labels
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (probs, labels))
    parts = [p for p in parts if len(p[1])]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def optimizer_state_due(config: Config, epoch: int) -> bool:
    """Whether epoch ``epoch``'s checkpoint carries the optimizer state: every
    ``train.optimizer_state_every``-th epoch, and the last one."""
    t = config.train
    return (epoch + 1) % t.optimizer_state_every == 0 or epoch == t.epochs - 1


def _frozen(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not p.requires_grad}


def _save_checkpoint(directory: Path, run: Engine, config: Config, state: dict, rank: int) -> None:
    if state["optimizer_state"]:
        # Frozen parameters (the token table, a frozen text tower) are rebuilt from the config.
        run.engine.save_checkpoint(
            str(directory / "deepspeed"),
            tag=DEEPSPEED_TAG,
            client_state=state,
            save_latest=False,
            exclude_frozen_parameters=True,
        )
    elif rank == 0:
        frozen = _frozen(run.engine.module)
        module = {k: v for k, v in run.engine.module.state_dict().items() if k not in frozen}
        torch.save({"module": module, "lr_scheduler": run.scheduler.state_dict()}, directory / WEIGHTS_FILE)
    torch.save(torch.get_rng_state(), directory / f"rng_rank{rank}.pt")
    if rank == 0:
        # The EMA's weights are model.pt's; ema.pt keeps the rest of its state (not the weights twice).
        ema_state = {k: v for k, v in run.ema.state_dict().items() if k != "module"}
        torch.save(ema_state, directory / "ema.pt")
        save_inference(run.ema.module, config, directory / "model.pt")
        dump_config(config, directory / "config.yaml")
        (directory / TRAIN_STATE_FILE).write_text(json.dumps(state, indent=2, default=float))


def _load_weights(run: Engine, path: Path) -> None:
    """Weights and schedule of a checkpoint written without optimizer state."""
    saved = torch.load(path, map_location=run.device, weights_only=True)
    missing, unexpected = run.engine.module.load_state_dict(saved["module"], strict=False)
    if unexpected or set(missing) - _frozen(run.engine.module):
        raise RuntimeError(
            f"{path}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if hasattr(run.engine.optimizer, "refresh_fp32_params"):  # ZeRO: its fp32 partitions follow the weights
        run.engine.optimizer.refresh_fp32_params()
    run.scheduler.load_state_dict(saved["lr_scheduler"])


@contextlib.contextmanager
def worker_copy(checkpoint, rank: int):
    """A local directory with the files of ``checkpoint`` that this worker alone reads: the
    checkpoint's own folder when it is on a local filesystem, else a private download, removed after.

    Not ``Checkpoint.as_directory()``: for a remote checkpoint it downloads into one temporary folder
    per checkpoint and node that all the node's workers share, and a worker that comes second
    downloads again into that folder while the first is reading it, so the first reads a truncated
    file (``model.pt``, DeepSpeed state) when two workers of a node resume from S3."""
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix=f"cliplung-resume-rank{rank}-") as tmp:
        checkpoint.to_directory(tmp)
        yield Path(tmp)


def _resume(checkpoint, run: Engine, config: Config, rank: int, world: int) -> tuple[int, int, str, dict]:
    """Load ``checkpoint`` into the engine and EMA; (first epoch to run, global step, note, its
    ``train_state.json``), from this worker's own copy of the checkpoint (:func:`worker_copy`)."""
    with worker_copy(checkpoint, rank) as ckpt_dir:
        state = json.loads((ckpt_dir / TRAIN_STATE_FILE).read_text())
        check_resume(config, state, world_size=world, checkpoint=str(checkpoint.path))
        note = ""
        if (ckpt_dir / "deepspeed").is_dir():
            run.engine.load_checkpoint(
                str(ckpt_dir / "deepspeed"),
                tag=DEEPSPEED_TAG,
                load_module_strict=False,  # frozen parameters are not saved (same config: same values)
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        else:
            _load_weights(run, ckpt_dir / WEIGHTS_FILE)
            note = (
                "; that checkpoint has no optimizer state (train.optimizer_state_every), so it starts afresh"
            )
        ema_state = torch.load(ckpt_dir / "ema.pt", weights_only=True)
        ema_state["module"] = torch.load(ckpt_dir / "model.pt", map_location=run.device, weights_only=True)[
            "state_dict"
        ]
        run.ema.load_state_dict(ema_state)
        rng_file = ckpt_dir / f"rng_rank{rank}.pt"
        if rng_file.exists():
            torch.set_rng_state(torch.load(rng_file, weights_only=True))
    return int(state["epoch"]) + 1, int(state["global_step"]), note, state


def _validation_keys(config: Config) -> list[str]:
    """The ``val/*`` keys an epoch reports (the diverged report carries them as NaN: Tune checks that
    its metric is in every result)."""
    n = config.data.num_classes
    return list(classification_metrics(np.arange(n), np.eye(n), config.data.class_names, prefix="val/"))


def _divergence_record() -> tuple[object, str]:
    """(filesystem, path) of this run's divergence record, from Ray's own storage of the run (the
    config's ``storage.path`` may be relative to a driver directory the worker does not share)."""
    storage = ray.train.get_context().get_storage()
    return storage.storage_filesystem, f"{storage.experiment_fs_path}/{DIVERGENCE_FILE}"


def _clear_divergence_record() -> None:
    fs, path = _divergence_record()
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_file(path)


def _report_divergence(config: Config, divergence: Divergence, monitor: LossMonitor) -> None:
    message = divergence.message(config.train.epochs)
    if ray.train.get_context().get_world_rank() == 0:
        _say(f"[diverged] {message}")
        record = {"message": message, **dataclasses.asdict(divergence)}
        fs, path = _divergence_record()
        with fs.open_output_stream(path) as f:
            f.write(json.dumps(record, default=float).encode())
    report = {
        "epoch": divergence.epoch,
        "global_step": divergence.global_step,
        **{f"train/{k}": v for k, v in monitor.means().items()},
        **dict.fromkeys(_validation_keys(config), float("nan")),
        "train/lr": divergence.lr,
        DIVERGED_KEY: 1.0,
        DIVERGENCE_KEY: message,
    }
    ray.train.report(report)  # no checkpoint: the newest stays the last good epoch's


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point; ``loop_config`` holds ``config`` (a dict), ``steps_per_epoch`` and
    ``data`` (the :class:`~cliplung.data.ingest.DataPlan`)."""
    config = config_from_dict(loop_config["config"])
    t = config.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    use_gpu = device.type == "cuda"

    # Same initial weights on every rank; DeepSpeed also broadcasts rank 0's parameters.
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    model = build_model(
        config.model, num_classes=config.data.num_classes, patch_size=config.prepare.patch_size
    )
    steps_per_epoch = loop_config["steps_per_epoch"]  # micro-batches per worker per epoch
    run = build_engine(config, model, device, max(1, steps_per_epoch // t.grad_accum))

    start_epoch, global_step, resumed_state = 0, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        start_epoch, global_step, note, resumed_state = _resume(checkpoint, run, config, rank, world)
        if rank == 0:
            _say(f"resuming from {checkpoint.path} (epoch {start_epoch} of {t.epochs} done){note}")

    if rank == 0:
        _clear_divergence_record()  # a record of an earlier attempt of this run name
    metrics_out = WorkerMetrics(config.name, rank, config.metrics)
    data = loop_config["data"].for_worker(rank, world, device)
    micro = t.micro_batch_size
    monitor = LossMonitor(device, names=loss_parts(config))
    stopper = EarlyStopping(t, resumed_state)  # the record _resume read: no second copy of the checkpoint

    for epoch in range(start_epoch, t.epochs):
        gen = epoch_generator(t.seed, epoch, rank)
        monitor.start_epoch(epoch)
        n_steps, samples, wait_total = 0, 0, 0.0
        epoch_start = time.perf_counter()
        batches = data.train_batches(epoch, micro)
        while n_steps < steps_per_epoch and monitor.divergence is None:
            step_start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            waited = time.perf_counter() - step_start
            parts, lr = train_step(run, batch, gen, config, global_step)
            global_step += 1
            n_steps += 1
            monitor.record(parts, step=n_steps, global_step=global_step, lr=lr)
            samples += micro
            wait_total += waited
            metrics_out.step(time.perf_counter() - step_start, waited, micro)
            _maybe_inject_fault(config, rank, global_step)
        monitor.flush()  # the one wait for the device per epoch
        train_seconds = time.perf_counter() - epoch_start
        divergence = monitor.divergence or ema_divergence(run.ema, monitor)
        if divergence is not None:
            _report_divergence(config, divergence, monitor)
            break
        losses = monitor.means()

        probs, labels = _gather(*_evaluate(run.ema.module, data, micro * 2))
        val = classification_metrics(labels, probs, config.data.class_names, prefix="val/")
        report = {
            "epoch": epoch,
            "epochs_done": epoch + 1,
            "global_step": global_step,
            **{f"train/{k}": v for k, v in losses.items()},
            **val,
            "train/lr": float(run.scheduler.get_last_lr()[0]),
            "train/samples_per_second": samples * world / max(train_seconds, 1e-9),
            "train/data_wait_share": wait_total / max(train_seconds, 1e-9),
            "train/epoch_seconds": train_seconds,
            "train/peak_memory_mb": _peak_memory_mb(device),
        }
        if rank == 0:
            shown = " ".join(
                f"{k}={report[k]:.4f}" for k in ("train/loss", "val/accuracy", "val/macro_f1", "val/auc")
            )
            _say(
                f"epoch {epoch + 1}/{t.epochs} {shown} "
                f"({train_seconds:.1f}s, {report['train/samples_per_second']:.1f} samples/s)",
            )
        gpu_mem = torch.cuda.max_memory_allocated() if use_gpu else 0
        metrics_out.epoch(
            epoch,
            losses,
            {k.split("/", 1)[1]: v for k, v in val.items()},
            samples_per_second=samples / max(train_seconds, 1e-9),
            gpu_memory_bytes=gpu_mem,
        )

        state = {
            "epoch": epoch,
            "global_step": global_step,
            "metrics": report,
            "optimizer_state": optimizer_state_due(config, epoch),
            **checkpoint_identity(config, world, run.precision),
            **stopper.after_epoch(epoch, report),
        }
        with tempfile.TemporaryDirectory(prefix="cliplung-ckpt-") as tmp:
            _save_checkpoint(Path(tmp), run, config, state, rank)
            upload_start = time.perf_counter()
            try:
                ray.train.report(
                    report,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"epoch_{epoch:04d}",
                )
            except Exception:
                metrics_out.checkpoint(time.perf_counter() - upload_start, failed=True)
                raise
            metrics_out.checkpoint(time.perf_counter() - upload_start)
        if stopper.stopped:  # this epoch's checkpoint, just reported, is the run's last
            if rank == 0:
                _say(stopper.summary())
            break
    metrics_out.finish()
    if config.train.debug_fail_at_step is not None and rank == 0:
        _fault_marker(config).unlink(missing_ok=True)
