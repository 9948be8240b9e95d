"""``cliplung bench ingest``: what a Ray Train worker iterates per epoch, as ratios to the one-process
ceilings measured in the same run, on the same store.

For each store (by default two temporary random stores of ``BENCH_ROWS`` nodules, at 16^3 and 32^3;
``--data`` measures one given store instead):

* **ceilings**, in this process, torch on one thread: ``read_each_epoch`` reads the training rows in
  256-row blocks every epoch, shuffles and augments them; ``in_memory`` has them in memory already
  and only shuffles and augments (both gather an epoch's order at once, then slice batches:
  :func:`~cliplung.bench.datapath.in_memory_epoch`). Every path does the same per-batch work
  (:func:`~cliplung.bench.datapath.null_step`: float conversion, flips, rot90, shift, intensity).
* **worker paths**: a real ``TorchTrainer`` (:func:`~cliplung.bench.datapath.run_null`) in
  ``memory`` mode at 1 and 2 workers, and in ``stream`` mode at 1 worker with 1 and 2 reader
  processes (``data.stream_readers``). Epoch 1 (which includes the workers collecting their
  shards) is reported on its own; the rate is the median of the later epochs. In ``memory`` mode
  each worker also runs the in-memory ceiling on its own shard, interleaved with the path epoch by
  epoch (``reference``), for a paired ratio that the machine's drift does not move.
* **DataLoader**: a PyTorch ``DataLoader`` with 2 worker processes reading one row per item, for
  reference.

Ratios: ``memory`` over the in-memory ceiling, paired in the same worker
(``memory_1w_over_in_memory_same_worker``, target >= 0.8; the target is judged on this one) and
over this process's ceiling measured before Ray starts (``memory_1w_over_in_memory``, which the
machine's drift between the two moves by tens of percent), ``stream`` over ``read_each_epoch``
(target >= 0.5), and readers 2 over readers 1. Speed targets are shown, never asserted.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cliplung.bench.datapath import in_memory_epoch, null_step, run_null
from cliplung.config import Config, load_config
from cliplung.data.augment import epoch_generator
from cliplung.data.ingest import _runs, compute_splits, read_block, shuffle_generator
from cliplung.data.preprocessing import store_preprocessing
from cliplung.data.store import NoduleStore

__all__ = ["BENCH_ROWS", "bench_config", "bench_ingest"]

BENCH_ROWS = 2600
"""Nodules of each temporary store: about LIDC-IDRI's count (about 1,770 training rows)."""
BLOCK_ROWS = 256
TARGETS = {"memory_1w_over_in_memory": 0.8, "stream_over_read_each_epoch": 0.5, "null_data_wait_share": 0.02}


def bench_config(store: str, *extra: str) -> Config:
    """The debug preset on ``store``, its ``prepare`` section matching how the store was cut."""
    opened = NoduleStore.open(store)
    prep = store_preprocessing(opened)
    sets = [f"data.store={store}", "metrics.enabled=false"]
    if "patch_size" in prep:
        sets.append(f"prepare.patch_size={int(prep['patch_size'])}")
    if "spacing_mm" in prep:
        sets.append(f"prepare.spacing_mm={float(prep['spacing_mm'])}")
    if "hu_window" in prep:
        lo, hi = (float(v) for v in prep["hu_window"])
        sets.append(f"prepare.hu_window=[{lo},{hi}]")
    return load_config("debug", [*sets, *extra])


class _StoreRows(torch.utils.data.Dataset):
    """One nodule per item, read from the store (opened lazily in each DataLoader worker)."""

    def __init__(self, path: str, rows: np.ndarray) -> None:
        self.path, self.rows, self._store = path, rows, None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        if self._store is None:
            self._store = NoduleStore.open(self.path)
        r = int(self.rows[i])
        row = self._store.read_rows(r, r + 1, fields=("patches", "label", "attributes"))
        return {
            "patches": torch.from_numpy(np.asarray(row["patches"][0], dtype=np.float16)),
            "label": int(row["label"][0]),
            "attributes": torch.from_numpy(np.asarray(row["attributes"][0], dtype=np.float32)),
        }


def _consume(batches, config: Config, epoch: int) -> int:
    gen = epoch_generator(config.train.seed, epoch, 0)
    acc = torch.zeros(())
    n = 0
    for batch in batches:
        null_step(batch, gen, config, acc)
        n += batch["label"].shape[0]
    acc.item()
    return n


def _shuffled_batches(block: dict[str, np.ndarray], epoch: int, batch: int):
    order = torch.randperm(len(block["label"]), generator=shuffle_generator(0, epoch, 0))
    return in_memory_epoch({k: torch.from_numpy(v) for k, v in block.items()}, order, batch)


def _rates(epoch_fn, epochs: int) -> dict:
    rates = []
    for e in range(epochs):
        start = time.perf_counter()
        n = epoch_fn(e)
        rates.append(n / (time.perf_counter() - start))
    later = rates[1:] or rates
    return {"epoch1": round(rates[0], 1), "median": round(statistics.median(later), 1)}


def _read_all(store: NoduleStore, task: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    blocks = [read_block(store, task, piece) for piece in _runs(rows, BLOCK_ROWS)]
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def _measure_store(store_path: str, batch: int, epochs: int, loader_workers: int) -> dict:
    config = bench_config(store_path, f"train.batch_size={batch}", "train.workers=1")
    store = NoduleStore.open(store_path)
    rows = compute_splits(store, config.data).train
    task = config.data.task
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a 1-CPU Ray Train worker runs
    try:
        read_each = _rates(
            lambda e: _consume(_shuffled_batches(_read_all(store, task, rows), e, batch), config, e), epochs
        )
        held = _read_all(store, task, rows)
        in_memory = _rates(lambda e: _consume(_shuffled_batches(held, e, batch), config, e), epochs)
        loader = torch.utils.data.DataLoader(
            _StoreRows(store_path, rows),
            batch_size=batch,
            shuffle=True,
            num_workers=loader_workers,
            drop_last=True,
            persistent_workers=True,
            generator=torch.Generator().manual_seed(0),
        )
        dataloader = _rates(lambda e: _consume(loader, config, e), 2)  # the slowest path: 2 epochs
    finally:
        torch.set_num_threads(threads)

    paths = {}
    for name, workers, mode, readers in (
        ("memory_1w", 1, "memory", 2),
        ("memory_2w", 2, "memory", 2),
        ("stream_1w_1reader", 1, "stream", 1),
        ("stream_1w_2readers", 1, "stream", 2),
    ):
        cfg = bench_config(
            store_path,
            f"train.workers={workers}",
            f"train.batch_size={batch * workers}",
            f"train.epochs={epochs}",
            f"data.ingest={mode}",
            f"data.stream_readers={readers}",
            f"data.stream_block_rows={BLOCK_ROWS}",
        )
        r = run_null(cfg, reference=mode == "memory")
        keep = (
            "epoch1_samples_per_s",
            "samples_per_s",
            "data_wait_share",
            "reference_samples_per_s",
            "over_reference",
        )
        paths[name] = {k: r[k] for k in keep if k in r}
        paths[name]["driver_setup_s"] = r["driver_setup_s"]

    def ratio(a: float, b: float) -> float:
        return round(a / b, 3) if b else float("nan")

    mem = in_memory["median"]
    read = read_each["median"]
    ratios = {
        "memory_1w_over_in_memory_same_worker": paths["memory_1w"]["over_reference"],
        "memory_2w_over_in_memory_same_workers": paths["memory_2w"]["over_reference"],
        "memory_1w_over_in_memory": ratio(paths["memory_1w"]["samples_per_s"], mem),
        "memory_1w_epoch1_over_in_memory": ratio(paths["memory_1w"]["epoch1_samples_per_s"], mem),
        "memory_2w_over_in_memory": ratio(paths["memory_2w"]["samples_per_s"], mem),
        "stream_1reader_over_read_each_epoch": ratio(paths["stream_1w_1reader"]["samples_per_s"], read),
        "stream_2readers_over_read_each_epoch": ratio(paths["stream_1w_2readers"]["samples_per_s"], read),
        "stream_2readers_over_1reader": ratio(
            paths["stream_1w_2readers"]["samples_per_s"], paths["stream_1w_1reader"]["samples_per_s"]
        ),
        "dataloader_over_read_each_epoch": ratio(dataloader["median"], read),
    }
    best_stream = max(
        ratios["stream_1reader_over_read_each_epoch"], ratios["stream_2readers_over_read_each_epoch"]
    )
    targets = {
        "memory_1w_over_in_memory": ratios["memory_1w_over_in_memory_same_worker"]
        >= TARGETS["memory_1w_over_in_memory"],
        "stream_over_read_each_epoch": best_stream >= TARGETS["stream_over_read_each_epoch"],
        "null_data_wait_share": paths["memory_1w"]["data_wait_share"] < TARGETS["null_data_wait_share"],
    }
    return {
        "store": store_path,
        "patch_size": int(store_preprocessing(store).get("patch_size", 0)),
        "train_rows": len(rows),
        "batch": batch,
        "epochs": epochs,
        "ceilings_patches_per_s": {"read_each_epoch": read_each, "in_memory": in_memory},
        "dataloader_patches_per_s": dataloader,
        "worker_paths": paths,
        "ratios": ratios,
        "targets_met": targets,
    }


def bench_ingest(
    store: str | None = None,
    batch: int = 32,
    epochs: int = 3,
    workers: int = 2,
    as_json: bool = False,
    *,
    rows: int = BENCH_ROWS,
    patch_sizes: tuple[int, ...] = (16, 32),
) -> dict:
    """Measure ``store`` (or temporary random stores at ``patch_sizes``); print and return the report."""
    from cliplung.bench.predict import _random_store

    results = []
    with tempfile.TemporaryDirectory(prefix="cliplung-bench-ingest-") as tmp:
        if store is not None:
            stores = [store]
        else:
            stores = []
            for p in patch_sizes:
                path = str(Path(tmp) / f"random-{p}")
                _random_store(path, rows, p)
                stores.append(path)
        for path in stores:
            results.append(_measure_store(path, batch, max(2, epochs), workers))
            if store is None:
                results[-1]["store"] = f"random {rows} nodules at {results[-1]['patch_size']}^3"
    report = {"targets": TARGETS, "stores": results}
    print(json.dumps(report, indent=None if as_json else 2))
    return report
