"""The per-worker training loop that Ray Train runs on every worker.

One loop for 1 CPU worker, 2 CPU workers (gloo) and N GPUs (nccl):

1. Rebuild the :class:`~cliplung.config.Config` from the loop config, seed, build the model.
2. Wrap it with ``deepspeed.initialize`` (ZeRO stage, bf16/fp32, gradient accumulation and
   clipping from the config; the optimizer and cosine schedule are torch objects handed to
   DeepSpeed so SGD, as published, works as well as AdamW).
3. Resume from ``ray.train.get_checkpoint()`` when the run has one: DeepSpeed state (model,
   optimizer, scheduler), the EMA weights, the epoch and the step counter. The data order and
   augmentation of an epoch are functions of (seed, epoch, rank), so nothing else is needed to
   replay an interrupted epoch exactly.
4. Each epoch: train on this worker's shard (augmented on the worker), evaluate the EMA model on
   the validation shard, gather predictions from all workers, compute the metrics, and report
   them with a checkpoint (DeepSpeed state + EMA + a plain inference export with its config).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import deepspeed
import numpy as np
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from cliplung.config import Config, config_from_dict, dump_config
from cliplung.data.augment import augment_batch, epoch_generator
from cliplung.model import ModelEMA, build_model, save_inference
from cliplung.train.early_stopping import EarlyStopping
from cliplung.train.metrics import classification_metrics
from cliplung.train.prometheus import WorkerMetrics

__all__ = ["deepspeed_config", "train_loop_per_worker"]

DEEPSPEED_TAG = "state"
SHUFFLE_BUFFER_MAX_ROWS = 4096
FAULT_DELAY_S = 3.0


def deepspeed_config(config: Config, use_gpu: bool) -> dict:
    """The DeepSpeed JSON config for a training config."""
    t = config.train
    bf16 = t.precision == "bf16" or (t.precision == "auto" and use_gpu)
    return {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": bf16},
        # Our optimizers are plain torch ones (SGD as published); ZeRO 1/2 partition them fine.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def cosine_schedule(total_steps: int, warmup_steps: int):
    """lr multiplier: linear warm-up, then cosine decay to 0 over ``total_steps`` optimizer steps."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _optimizer(config: Config, params) -> torch.optim.Optimizer:
    t = config.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


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
    time.sleep(FAULT_DELAY_S)
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


def _mean_across_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


@torch.no_grad()
def _evaluate(model: torch.nn.Module, shard, batch_size: int, device, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels of this worker's validation shard."""
    model.eval()
    probs, labels = [], []
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
        logits = model.predict(batch["patches"].to(dtype))
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        labels.append(batch["label"].cpu().numpy())
    model.train()
    if not probs:
        return np.zeros((0, 0)), np.zeros((0,), dtype=np.int64)
    return np.concatenate(probs), np.concatenate(labels)


def _gather(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return probs, labels
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (probs, labels))
    parts = [p for p in parts if len(p[1])]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _save_checkpoint(directory: Path, engine, ema: ModelEMA, config: Config, state: dict, rank: int) -> None:
    engine.save_checkpoint(
        str(directory / "deepspeed"), tag=DEEPSPEED_TAG, client_state=state, save_latest=False
    )
    torch.save(torch.get_rng_state(), directory / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save(ema.state_dict(), directory / "ema.pt")
        save_inference(ema.module, config, directory / "model.pt")
        dump_config(config, directory / "config.yaml")
        (directory / "train_state.json").write_text(json.dumps(state, indent=2, default=float))


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point; ``loop_config`` holds ``config`` (a dict) and ``steps_per_epoch``."""
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
    ema = ModelEMA(model, decay=t.ema_decay)
    steps_per_epoch = loop_config["steps_per_epoch"]  # micro-batches per worker per epoch
    opt_steps_per_epoch = max(1, steps_per_epoch // t.grad_accum)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(config, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(t.epochs * opt_steps_per_epoch, t.warmup_epochs * opt_steps_per_epoch)
    )
    ds_config = deepspeed_config(config, use_gpu)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    ema.module.to(device)

    start_epoch, global_step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            _, client_state = engine.load_checkpoint(
                str(Path(ckpt_dir) / "deepspeed"),
                tag=DEEPSPEED_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            ema.load_state_dict(torch.load(Path(ckpt_dir) / "ema.pt", map_location=device, weights_only=True))
            rng_file = Path(ckpt_dir) / f"rng_rank{rank}.pt"
            if rng_file.exists():
                torch.set_rng_state(torch.load(rng_file, weights_only=True))
        start_epoch = int(client_state["epoch"]) + 1
        global_step = int(client_state["global_step"])
        if rank == 0:
            _say(f"resuming from {checkpoint.path} (epoch {start_epoch} of {t.epochs} done)")

    ray.data.DataContext.get_current().enable_progress_bars = False
    metrics_out = WorkerMetrics(config.name, rank, config.metrics.port, enabled=config.metrics.enabled)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    micro = t.micro_batch_size
    shuffle_rows = min(SHUFFLE_BUFFER_MAX_ROWS, steps_per_epoch * micro)
    stopper = EarlyStopping(t, client_state if checkpoint is not None else None)

    for epoch in range(start_epoch, t.epochs):
        gen = epoch_generator(t.seed, epoch, rank)
        sums: dict[str, float] = {}
        n_steps, samples, wait_total = 0, 0, 0.0
        epoch_start = time.perf_counter()
        batches = iter(
            train_shard.iter_torch_batches(
                batch_size=micro,
                drop_last=True,
                device=device,
                local_shuffle_buffer_size=shuffle_rows,
                local_shuffle_seed=t.seed * 100_003 + epoch,
            )
        )
        while n_steps < steps_per_epoch:
            step_start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            waited = time.perf_counter() - step_start
            images = augment_batch(batch["patches"], gen, t.augment).to(dtype)
            out = engine(images, labels=batch["label"], attributes=batch["attributes"].to(dtype))
            engine.backward(out["loss"])
            engine.step()
            global_step += 1
            if global_step % t.grad_accum == 0:  # an optimizer step happened
                ema.update(engine.module)
            n_steps += 1
            samples += images.shape[0]
            wait_total += waited
            sums["loss"] = sums.get("loss", 0.0) + float(out["loss"].detach())
            for part, value in out["parts"].items():
                sums[part] = sums.get(part, 0.0) + float(value)
            metrics_out.step(time.perf_counter() - step_start, waited, images.shape[0])
            _maybe_inject_fault(config, rank, global_step)
        train_seconds = time.perf_counter() - epoch_start
        losses = _mean_across_workers({k: v / max(1, n_steps) for k, v in sums.items()}, device)

        probs, labels = _gather(*_evaluate(ema.module, val_shard, micro * 2, device, dtype))
        val = classification_metrics(labels, probs, config.data.class_names, prefix="val/")
        report = {
            "epoch": epoch,
            "epochs_done": epoch + 1,
            "global_step": global_step,
            **{f"train/{k}": v for k, v in losses.items()},
            **val,
            "train/lr": float(scheduler.get_last_lr()[0]),
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
            **stopper.after_epoch(epoch, report),
        }
        with tempfile.TemporaryDirectory(prefix="cliplung-ckpt-") as tmp:
            _save_checkpoint(Path(tmp), engine, ema, config, state, rank)
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
    if config.train.debug_fail_at_step is not None and rank == 0:
        _fault_marker(config).unlink(missing_ok=True)
