"""``cliplung bench train``: samples/s at 1 and 2 CPU workers, data-wait share, peak memory per
worker for ZeRO stages 0, 1 and 2 (debug preset, one short run each, on the embedded Ray).

``--model null``: the same data path with no model (:mod:`cliplung.bench.datapath`), at 1 and 2
workers: the samples/s and data-wait share the data path alone can feed."""

from __future__ import annotations

import json
import tempfile

from cliplung.config import load_config
from cliplung.train.trainer import train

__all__ = ["bench_train"]


def bench_null(store: str, epochs: int = 3, batch: int = 32, ingest: str = "auto", as_json: bool = False):
    from cliplung.bench.datapath import run_null
    from cliplung.bench.ingest import bench_config

    rows = []
    for workers in (1, 2):
        config = bench_config(
            store,
            f"train.workers={workers}",
            f"train.batch_size={batch * workers}",
            f"train.epochs={max(2, epochs)}",
            f"data.ingest={ingest}",
        )
        r = run_null(config)
        rows.append({k: v for k, v in r.items() if k != "epochs"} | {"per_epoch": r["epochs"]})
    if as_json:
        print(json.dumps(rows))
    else:
        print(f"{'workers':>7} {'mode':>6} {'samples/s':>10} {'epoch 1':>10} {'data wait':>9}")
        for r in rows:
            print(
                f"{r['workers']:>7} {r['mode']:>6} {r['samples_per_s']:>10.1f} "
                f"{r['epoch1_samples_per_s']:>10.1f} {r['data_wait_share']:>9.2%}"
            )
    return rows


def bench_train(
    store: str, preset: str = "debug", epochs: int = 2, as_json: bool = False, model: str = "preset"
) -> list[dict]:
    if model == "null":
        return bench_null(store, epochs=epochs, as_json=as_json)
    cases = [(1, 0), (2, 0), (2, 1), (2, 2)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cliplung-bench-") as storage:
        for workers, zero in cases:
            config = load_config(
                preset,
                [
                    f"data.store={store}",
                    f"storage.path={storage}",
                    f"name=bench-w{workers}-z{zero}",
                    f"train.workers={workers}",
                    f"train.zero_stage={zero}",
                    f"train.epochs={epochs}",
                    "train.max_failures=0",
                    "metrics.enabled=false",
                ],
            )
            m = train(config).metrics
            rows.append(
                {
                    "workers": workers,
                    "zero_stage": zero,
                    "samples_per_s": round(m["train/samples_per_second"], 1),
                    "data_wait_share": round(m["train/data_wait_share"], 4),
                    "peak_memory_mb_per_worker": round(m["train/peak_memory_mb"], 1),
                    "epoch_seconds": round(m["train/epoch_seconds"], 2),
                }
            )
    if as_json:
        print(json.dumps(rows))
    else:
        print(f"{'workers':>7} {'ZeRO':>4} {'samples/s':>10} {'data wait':>9} {'peak MiB/worker':>15}")
        for r in rows:
            print(
                f"{r['workers']:>7} {r['zero_stage']:>4} {r['samples_per_s']:>10.1f} "
                f"{r['data_wait_share']:>9.1%} {r['peak_memory_mb_per_worker']:>15.0f}"
            )
    return rows
