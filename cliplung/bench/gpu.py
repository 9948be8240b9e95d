"""``cliplung bench gpu``: the GPU figures in one run on one device, in under 8 minutes.

::

    cliplung bench gpu              # on a CUDA machine: one JSON report (and a short summary)
    cliplung bench gpu --dry-run    # the same code at tiny sizes on the CPU (a test keeps it working)

Sections, in order (each is skipped, and says so, once the time budget is spent):

``train_step``
    The paper preset's training step as a worker runs it (:func:`cliplung.train.step.train_step`:
    augmentation, DeepSpeed ZeRO 0, bf16 autocast over fp32 weights, EMA, loss monitor), batch 32 on
    one device: samples/s, FLOPs per step (``torch.utils.flop_counter``), achieved TFLOP/s and its
    share of the device's dense bf16 peak, peak allocated memory, and the host syncs of one step
    (:class:`~cliplung.bench.syncs.HostSyncCounter`; 0 expected). Then the same with
    ``train.compile`` when the budget allows.
``text_path``
    ``cliplung bench model`` on the device: the batched text path against the per-sample 77-token
    formulation (train-step samples/s, FLOPs, bf16 share of peak), and ``predict`` of both methods.
``sync_debug``
    The model paths of issue 17 (training forward and backward of every method in bf16 autocast, the
    per-sample reference, augmentation, the EMA update, the loss monitor, a DeepSpeed step, predict)
    each run under ``torch.cuda.set_sync_debug_mode("warn")``: the synchronising CUDA calls each
    makes (0 expected). On the CPU (``--dry-run``) the counter's reads and blocking copies instead.
``predict``
    What ``cliplung predict`` does per batch (:func:`cliplung.evaluate.evaluate.predict_probabilities`
    on the exported paper model): patches/s at batch 256 on the device.
``data_path``
    The data path at device rates (:func:`data_path_figures`): the ``null`` model's samples/s and
    data-wait share in memory mode, paired with the in-memory ceiling on the device, and one 1-worker training trial alone vs two packed on one GPU
    (``train.gpus_per_worker=0.5``). Starts an embedded Ray.

The report's ``device`` names the GPU; paste the figures into README's Benchmarks with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cliplung.bench import GPU_SECTIONS
from cliplung.bench.model import _gpu_peak, bench_model
from cliplung.bench.syncs import HostSyncCounter
from cliplung.config import ATTRIBUTES, apply_overrides
from cliplung.config import preset as load_preset
from cliplung.model.attributes import RATING_RANGES

__all__ = ["bench_gpu", "data_path_figures"]

BUDGET_S = 420.0
"""Default time budget (7 minutes, so the whole run stays under 8 with start-up)."""
SIZES = {
    # preset, batch, warm-up steps, timed steps, predict patches, predict batch
    "gpu": {
        "preset": "paper",
        "batch": 32,
        "warmup": 5,
        "steps": 30,
        "predict_rows": 4096,
        "predict_batch": 256,
    },
    "dry": {"preset": "debug", "batch": 4, "warmup": 1, "steps": 2, "predict_rows": 64, "predict_batch": 32},
}


DATA_PATH_SIZES = {
    # store rows, patch, null-model epochs, packing preset and epochs
    "gpu": {"rows": 2600, "patch": 32, "epochs": 3, "preset": "paper", "train_epochs": 2},
    "dry": {"rows": 240, "patch": 16, "epochs": 2, "preset": "debug", "train_epochs": 1},
}


def _packed_trials(store: str, preset: str, epochs: int, gpus: float, trials: int, storage: str) -> dict:
    """``trials`` one-worker training runs at once, each with ``gpus`` of a GPU (0: CPU), each
    started from its own process as a Tune trial is; samples/s of each and together."""
    import ray

    from cliplung.bench.ingest import bench_config

    @ray.remote(num_cpus=0)
    def trial(overrides: list[str]) -> float:
        from cliplung.train.trainer import train

        return float(train(bench_config(store, *overrides)).metrics["train/samples_per_second"])

    common = [
        "train.workers=1",
        f"train.gpus_per_worker={gpus}",
        f"train.epochs={epochs}",
        "train.max_failures=0",
        f"storage.path={storage}",
    ]
    if preset == "paper":
        common.append("train.batch_size=32")
    started = time.perf_counter()
    rates = ray.get([trial.remote([*common, f"name=pack-{trials}-{i}"]) for i in range(trials)])
    return {
        "trials": trials,
        "gpus_per_trial": gpus,
        "samples_per_s_each": [round(r, 1) for r in rates],
        "samples_per_s_total": round(sum(rates), 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def data_path_figures(device: torch.device, dry_run: bool) -> dict[str, Any]:
    """Issue 14's data-path figures on this device: the ``null`` model's samples/s and data-wait share
    at device rates (:func:`cliplung.bench.datapath.run_null`, in-memory mode, one worker with the
    whole device) on a random store, paired epoch by epoch with the in-memory ceiling on the same
    device (``reference``), and one 1-worker training trial alone vs two packed on one GPU
    (``train.gpus_per_worker=0.5``; in the dry run, two CPU trials). Starts an embedded Ray."""
    from cliplung.bench.datapath import run_null
    from cliplung.bench.ingest import bench_config
    from cliplung.bench.predict import _random_store

    sizes = DATA_PATH_SIZES["dry" if dry_run else "gpu"]
    use_gpu = device.type == "cuda"
    gpu = 1 if use_gpu else 0
    with tempfile.TemporaryDirectory(prefix="cliplung-gpu-data-") as tmp:
        store = os.path.join(tmp, "store")
        _random_store(store, sizes["rows"], sizes["patch"])
        config = bench_config(
            store,
            "train.workers=1",
            f"train.gpus_per_worker={gpu}",
            "train.batch_size=32",
            f"train.epochs={sizes['epochs']}",
            "data.ingest=memory",
        )
        null = run_null(config, use_gpu=use_gpu, reference=True)
        storage = os.path.join(tmp, "runs")
        one = _packed_trials(store, sizes["preset"], sizes["train_epochs"], gpu, 1, storage)
        two = _packed_trials(store, sizes["preset"], sizes["train_epochs"], gpu / 2, 2, storage)
    return {
        "store": f"random {sizes['rows']} nodules at {sizes['patch']}^3",
        "null_model_samples_per_s": null["samples_per_s"],
        "null_model_epoch1_samples_per_s": null["epoch1_samples_per_s"],
        "null_model_data_wait_share": null["data_wait_share"],
        "in_memory_reference_samples_per_s": null["reference_samples_per_s"],
        "null_model_over_in_memory_reference": null["over_reference"],
        "packing_preset": sizes["preset"],
        "tune_one_trial": one,
        "tune_two_packed_trials": two,
        "packing_gain": round(two["samples_per_s_total"] / max(one["samples_per_s_total"], 1e-9), 3),
    }


# --------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(batch: int, patch: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([RATING_RANGES[a][0] for a in ATTRIBUTES], dtype=torch.float)
    hi = torch.tensor([RATING_RANGES[a][1] for a in ATTRIBUTES], dtype=torch.float)
    out = {
        "patches": torch.rand(batch, patch, patch, patch, generator=g),
        "label": torch.arange(batch) % 3,
        "attributes": lo + (hi - lo) * torch.rand(batch, len(ATTRIBUTES), generator=g),
    }
    return {k: v.to(device) for k, v in out.items()}


def _ensure_process_group(device: torch.device) -> None:
    """A one-process group for DeepSpeed (nccl on a GPU, gloo on the CPU), unless one exists. It is
    left in place for the life of the process: DeepSpeed keeps references to the groups it saw."""
    if dist.is_initialized():
        return
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    store = os.path.join(tempfile.mkdtemp(prefix="cliplung-bench-pg-"), "store")
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}", rank=0, world_size=1
    )


class _SyncWatch:
    """Synchronising calls of a block: CUDA's sync-debug warnings on a GPU, the counter elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            self._warnings = warnings.catch_warnings(record=True)
            self.caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self._counter = HostSyncCounter()
            self._counter.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.set_sync_debug_mode(0)
            self._warnings.__exit__(*exc)
            messages = [str(w.message) for w in self.caught if "synchroniz" in str(w.message)]
            self.count, self.sites = len(messages), sorted(set(messages))[:5]
        else:
            self._counter.__exit__(*exc)
            self.count, self.sites = self._counter.total, self._counter.sites[:5]
        return False


# --------------------------------------------------------------------------- sections


def _train_step(sizes: dict, device: torch.device, compile_model: bool) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    from cliplung.data.augment import epoch_generator
    from cliplung.model import build_model
    from cliplung.train.step import LossMonitor, build_engine, loss_parts, train_step

    base = load_preset(sizes["preset"])
    b = sizes["batch"]
    cfg = apply_overrides(
        base,
        [
            "train.workers=1",
            f"train.batch_size={b}",
            "train.precision=bf16",
            "train.zero_stage=0",
            f"train.compile={str(compile_model).lower()}",
            f"train.gpus_per_worker={1 if device.type == 'cuda' else 0}",
            "model.text_pretrained=null",
        ],
    )
    patch = cfg.prepare.patch_size
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(cfg.model, num_classes=cfg.data.num_classes, patch_size=patch)
    run = build_engine(cfg, model, device, opt_steps_per_epoch=1000)
    built = time.perf_counter() - start
    monitor = LossMonitor(device, names=loss_parts(cfg))
    gen = epoch_generator(0, 0, 0)
    batch = _batch(b, patch, device)
    step = 0

    def one() -> None:
        nonlocal step
        parts, lr = train_step(run, batch, gen, cfg, step)
        step += 1
        monitor.record(parts, step=step, global_step=step, lr=lr)

    start = time.perf_counter()
    for _ in range(sizes["warmup"]):
        one()
    _sync(device)
    warmup_s = time.perf_counter() - start
    counter = FlopCounterMode(display=False)
    with counter:
        one()
    flops = counter.get_total_flops()
    with HostSyncCounter() as host:
        one()
    with _SyncWatch(device) as watch:
        one()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    for _ in range(sizes["steps"]):
        one()
    monitor.flush()
    _sync(device)
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "preset": sizes["preset"],
        "batch": b,
        "precision": run.precision,
        "zero_stage": 0,
        "compile": compile_model,
        "optimizer": type(run.engine.optimizer).__name__,
        "engine_build_s": round(built, 2),
        "warmup_s": round(warmup_s, 2),
        "timed_steps": sizes["steps"],
        "step_s": seconds / sizes["steps"],
        "samples_per_s": b * sizes["steps"] / seconds,
        "gflop_per_step": flops / 1e9,
        "achieved_tflop_per_s": flops * sizes["steps"] / seconds / 1e12,
        "host_syncs_per_step": host.total,
        "host_sync_sites": host.sites[:5],
        "sync_debug_warnings_per_step": watch.count if device.type == "cuda" else None,
        "sync_debug_sites": watch.sites if device.type == "cuda" else [],
        "loss_finite": monitor.divergence is None,
    }
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        peak = _gpu_peak(device)
        result["bf16_dense_peak_tflop_per_s"] = peak[0] / 1e12 if peak else None
        result["share_of_bf16_peak"] = result["achieved_tflop_per_s"] * 1e12 / peak[0] if peak else None
    return result


def _sync_debug(device: torch.device) -> dict[str, Any]:
    """Synchronising calls per model path (see the module docstring)."""
    from cliplung.data.augment import augment_batch, epoch_generator
    from cliplung.model import ModelEMA, build_model
    from cliplung.model.reference import reference_forward
    from cliplung.train.step import LossMonitor

    debug = load_preset("debug")
    patch = debug.prepare.patch_size
    batch = _batch(8, patch, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    paths: dict[str, Callable[[], Any]] = {}
    models = {}
    for name, changes in (
        ("ce", {"method": "ce"}),
        ("coop", {"method": "coop"}),
        ("cocoop", {"method": "cocoop"}),
        ("cliplung", {}),
        ("cliplung-rating", {"attribute_prompts": "rating"}),
        ("cliplung-3d", {"image_encoder": "resnet18_3d"}),
    ):
        torch.manual_seed(0)
        cfg = dataclasses.replace(debug.model, **changes)
        models[name] = build_model(cfg, num_classes=3, patch_size=patch).to(device)

        def forward_backward(m=models[name]) -> None:
            with autocast:
                out = m(batch["patches"], labels=batch["label"], attributes=batch["attributes"])
            out["loss"].backward()

        paths[f"forward+backward {name} (bf16 autocast)"] = forward_backward
    model = models["cliplung"]
    ema = ModelEMA(model.classifier, decay=0.999)
    monitor = LossMonitor(device)
    gen = epoch_generator(0, 0, 0)
    paths["per-sample reference forward+backward"] = lambda: reference_forward(
        model, batch["patches"], batch["label"], batch["attributes"]
    )["loss"].backward()
    paths["augmentation"] = lambda: augment_batch(batch["patches"], gen, debug.train.augment)
    paths["EMA update"] = lambda: ema.update(model.classifier)
    paths["EMA finite check (device flag)"] = ema.all_finite
    parts = [torch.ones((), device=device) for _ in range(5)]
    paths["loss monitor record"] = lambda: [
        monitor.record(parts, step=i, global_step=i, lr=1e-3) for i in range(1, 4)
    ]
    paths["predict"] = lambda: torch.no_grad()(model.eval().predict)(batch["patches"])
    out: dict[str, Any] = {}
    for name, fn in paths.items():
        fn()  # warm-up: lazy initialisation is not the steady state
        _sync(device)
        with _SyncWatch(device) as watch:
            fn()
        out[name] = {"syncs": watch.count, "sites": watch.sites}
        model.train()
    return out


def _predict(sizes: dict, device: torch.device) -> dict[str, Any]:
    from cliplung.evaluate.evaluate import predict_probabilities
    from cliplung.model import build_model, export_inference

    cfg = load_preset(sizes["preset"])
    patch = cfg.prepare.patch_size
    torch.manual_seed(0)
    full = build_model(cfg.model, num_classes=cfg.data.num_classes, patch_size=patch, load_pretrained=False)
    model = export_inference(full).to(device)
    del full
    rng = np.random.default_rng(0)
    patches = rng.random((sizes["predict_rows"], patch, patch, patch), dtype=np.float32)
    bs = sizes["predict_batch"]
    predict_probabilities(model, patches[:bs], batch_size=bs, device=str(device))
    _sync(device)
    start = time.perf_counter()
    probs = predict_probabilities(model, patches, batch_size=bs, device=str(device))
    seconds = time.perf_counter() - start
    return {
        "preset": sizes["preset"],
        "rows": len(patches),
        "batch": bs,
        "patches_per_s": len(patches) / seconds,
        "seconds": seconds,
        "probabilities_finite": bool(np.isfinite(probs).all()),
        "includes": "host-to-device copy of each batch, image encoder + head, softmax, copy back",
    }


# --------------------------------------------------------------------------- driver


def bench_gpu(
    *, dry_run: bool = False, budget_s: float = BUDGET_S, as_json: bool = False, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run every section but ``skip`` (``dry_run``: tiny sizes on the CPU); print the JSON report."""
    from cliplung.train.preflight import check_cuda, probe_cuda

    started = time.perf_counter()
    sizes = SIZES["dry" if dry_run else "gpu"]
    if dry_run:
        device = torch.device("cpu")
    else:
        probe = probe_cuda()
        check_cuda(
            apply_overrides(load_preset("debug"), ["train.gpus_per_worker=1", "train.workers=1"]), probe
        )
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "dry_run": dry_run,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "budget_s": budget_s,
    }
    if device.type == "cuda":
        report["driver"] = probe.driver_version
    timings: dict[str, float] = {}
    left = lambda: budget_s - (time.perf_counter() - started)  # noqa: E731

    def section(name: str, needs_s: float, fn: Callable[[], Any]) -> None:
        if name in skip:
            report[name] = {"skipped": "asked to (--skip)"}
            return
        if left() < needs_s and not dry_run:
            report[name] = {"skipped": f"time budget: {left():.0f} s left, needs about {needs_s:.0f} s"}
            return
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:  # a section's failure is a figure too; the others still run
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        timings[name] = round(time.perf_counter() - t0, 1)

    _ensure_process_group(device)
    section("train_step", 60, lambda: _train_step(sizes, device, compile_model=False))
    text = ("debug", 2, 1) if dry_run else ("paper", 32, 5)
    section(
        "text_path",
        90,
        lambda: bench_model(text[0], batch=text[1], device=device.type, steps=text[2], quiet=True),
    )
    section("sync_debug", 30, lambda: _sync_debug(device))
    section("predict", 30, lambda: _predict(sizes, device))
    section("data_path", 120, lambda: data_path_figures(device, dry_run))
    if not dry_run:  # compiling the paper model takes minutes on a CPU; a GPU run has the time
        section("train_step_compiled", 180, lambda: _train_step(sizes, device, compile_model=True))
    report["section_seconds"] = timings
    report["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=None if as_json else 2, default=str))
    sys.stdout.flush()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cliplung.bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S)
    parser.add_argument("--json", action="store_true", help="one JSON line")
    parser.add_argument(
        "--skip", action="append", default=[], choices=GPU_SECTIONS, help="a section not to run (repeatable)"
    )
    args = parser.parse_args(argv)
    bench_gpu(dry_run=args.dry_run, budget_s=args.budget_s, as_json=args.json, skip=tuple(args.skip))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
