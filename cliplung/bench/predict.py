"""Prediction throughput: exported ``cliplung`` vs ``ce`` checkpoints, and Ray Data batch inference.

::

    python -m cliplung.bench.predict --preset debug            # prints one JSON object
    python -m cliplung.bench.predict --preset paper --data stores/phantom --concurrency 2

**Checkpoints.** A ``cliplung`` model (text tower, prompt learner and all) and a ``ce`` model are
built from the preset with random weights, saved with :func:`cliplung.model.save_inference` and loaded
back with :func:`cliplung.evaluate.evaluate.load_checkpoint`, the path ``evaluate`` and ``predict``
take. The export is image encoder + head, the parameters of ``ce`` exactly, so both should run at the
same patches/s: ``ratio_cliplung_over_ce`` is reported and ``within_10pct`` checks it.
Timing: ``warmup`` batches, then ``steps`` timed batches of ``batch`` random patches per model under
``torch.no_grad`` in eval mode at ``model_threads`` torch threads (1 by default: on a shared
machine extra threads measure contention, not the model), the two models alternating A B B A ...
Patches/s is reported from the median batch time and from the fastest one (the least disturbed
estimate of a model's own cost on a busy machine); the ratio is given for both.

**Batch inference.** :func:`cliplung.evaluate.predict.predict_store` over ``data`` (or a temporary
random store of ``rows`` nodules), with Ray started beforehand and one untimed pass first (warms
Ray's worker pool, imports and the page cache). The timed pass is end to end: read tasks, actor
start and model load, ``map_batches`` inference, collection on the driver, the Parquet write; the
start-up is amortised over ``rows`` nodules. For scale, the same model scoring the store's patches
in this process at one torch thread (what each actor uses) and at torch's default thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliplung.config import apply_overrides
from cliplung.config import preset as load_preset

__all__ = ["bench_predict"]


def _timed_batches(
    models: dict[str, torch.nn.Module], images: torch.Tensor, steps: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Per model: patches/s from the median and from the fastest batch time.

    The models alternate A B B A ... so neither always runs first; on a shared machine the fastest
    batch is the least disturbed estimate of a model's own cost, the median the typical one."""
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    with torch.no_grad():
        for _ in range(warmup):
            for model in models.values():
                model(images)
        for step in range(steps):
            for name in names if step % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                models[name](images)
                times[name].append(time.perf_counter() - start)
    n = images.shape[0]
    return {name: {"median": n / statistics.median(t), "best": n / min(t)} for name, t in times.items()}


def _random_store(path: str, rows: int, patch: int, seed: int = 0) -> None:
    from cliplung.data.store import write_store

    rng = np.random.default_rng(seed)
    patients = np.arange(rows) // 2
    malignancy = rng.choice([2.0, 3.0, 4.0], size=rows).astype(np.float32)
    write_store(
        path,
        rng.random((rows, patch, patch, patch), dtype=np.float32),
        fold=(patients % 5).astype(np.int8),
        attrs={"source": "bench", "patch_size": patch, "spacing_mm": 1.0, "hu_window": [-1000.0, 400.0]},
        label=np.where(malignancy < 3, 0, np.where(malignancy == 3, 1, 2)).astype(np.int8),
        malignancy=malignancy,
        attributes=np.full((rows, 8), 3.0, dtype=np.float32),
        n_readers=np.full(rows, 4, dtype=np.int8),
        diameter_mm=np.full(rows, 8.0, dtype=np.float32),
        centroid_vox=np.zeros((rows, 3), dtype=np.float32),
        patient_id=[f"BENCH-{p:04d}" for p in patients],
        nodule_id=[f"BENCH-{p:04d}/n{i % 2:02d}" for i, p in enumerate(patients)],
        series_uid=[f"1.2.3.{p}" for p in patients],
    )


def bench_predict(
    preset: str = "debug",
    *,
    batch: int = 32,
    steps: int = 20,
    warmup: int = 3,
    data: str | None = None,
    rows: int = 2048,
    concurrency: int = 1,
    model_threads: int = 1,
    as_json: bool = True,
) -> dict[str, Any]:
    """Run both measurements and print (and return) the JSON result."""
    from cliplung.evaluate.checkpoints import load_checkpoint
    from cliplung.evaluate.evaluate import predict_probabilities
    from cliplung.evaluate.predict import predict_store
    from cliplung.model import build_model, save_inference

    base = load_preset(preset)
    patch = base.prepare.patch_size
    torch.manual_seed(0)
    images = torch.rand(batch, patch, patch, patch)
    with tempfile.TemporaryDirectory(prefix="cliplung-bench-predict-") as tmp:
        loaded: dict[str, torch.nn.Module] = {}
        n_params: dict[str, int] = {}
        for method in ("cliplung", "ce"):
            cfg = apply_overrides(base, [f"model.method={method}"])
            full = build_model(
                cfg.model, num_classes=cfg.data.num_classes, patch_size=patch, load_pretrained=False
            )
            n_params[f"{method}_trained"] = sum(p.numel() for p in full.parameters())
            path = save_inference(full, cfg, Path(tmp) / method / "model.pt")
            del full
            loaded[method], _ = load_checkpoint(path)
            n_params[f"{method}_exported"] = sum(p.numel() for p in loaded[method].parameters())
        threads = torch.get_num_threads()
        torch.set_num_threads(model_threads)
        try:
            rates = _timed_batches(loaded, images, steps, warmup)
        finally:
            torch.set_num_threads(threads)
        ratio = {k: rates["cliplung"][k] / rates["ce"][k] for k in ("median", "best")}

        store = data
        if store is None:
            store = str(Path(tmp) / "store")
            _random_store(store, rows, patch)
        from cliplung.cluster import ensure_ray, shutdown_ray

        ensure_ray()
        try:
            ckpt = str(Path(tmp) / "cliplung" / "model.pt")
            out = str(Path(tmp) / "scores.parquet")
            predict_store(ckpt, store, out, batch_size=batch, concurrency=concurrency)  # warm-up pass
            summary = predict_store(ckpt, store, out, batch_size=batch, concurrency=concurrency)
        finally:
            shutdown_ray()
        from cliplung.data.store import NoduleStore

        opened = NoduleStore.open(store)
        store_patches = np.asarray(opened.read_rows(0, min(opened.num_nodules, 256), ("patches",))["patches"])
        in_process = {}
        for n_threads in (1, threads):
            torch.set_num_threads(n_threads)
            predict_probabilities(loaded["cliplung"], store_patches[:batch], batch_size=batch)
            start = time.perf_counter()
            predict_probabilities(loaded["cliplung"], store_patches, batch_size=batch)
            in_process[n_threads] = len(store_patches) / (time.perf_counter() - start)
        torch.set_num_threads(threads)

    result = {
        "preset": preset,
        "patch": patch,
        "batch": batch,
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "params": n_params,
        "model_threads": model_threads,
        "cliplung_patches_per_s": {k: round(v, 1) for k, v in rates["cliplung"].items()},
        "ce_patches_per_s": {k: round(v, 1) for k, v in rates["ce"].items()},
        "ratio_cliplung_over_ce": {k: round(v, 3) for k, v in ratio.items()},
        "within_10pct": {k: abs(v - 1.0) <= 0.10 for k, v in ratio.items()},
        "ray_data": {
            "store": data or f"temporary random store ({rows} nodules)",
            "rows": summary["rows"],
            "concurrency": concurrency,
            "threads_per_actor": 1,
            "seconds": summary["seconds"],
            "ray_data_patches_per_s": summary["patches_per_s"],
            "includes": "read tasks, actor start and model load, inference, collection; not Ray start",
            "in_process_patches_per_s_1_thread": round(in_process[1], 1),
            f"in_process_patches_per_s_{threads}_threads": round(in_process[threads], 1),
        },
    }
    print(json.dumps(result, indent=None if as_json else 2))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cliplung.bench.predict", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", default="debug", choices=["debug", "paper"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data", help="store for the Ray Data part (default: a temporary random one)")
    parser.add_argument("--rows", type=int, default=2048, help="nodules of the temporary store")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the model comparison")
    parser.add_argument("--concurrency", type=int, default=1, help="model actors")
    parser.add_argument("--pretty", action="store_true", help="indented JSON")
    args = parser.parse_args(argv)
    bench_predict(
        args.preset,
        batch=args.batch,
        steps=args.steps,
        data=args.data,
        rows=args.rows,
        concurrency=args.concurrency,
        model_threads=args.threads,
        as_json=not args.pretty,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
