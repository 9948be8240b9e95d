"""``cliplung bench ingest``: patches/s through the Ray Data pipeline vs a plain PyTorch DataLoader.

Both read the training rows of the same store, in shuffled order, in batches, and apply the same
augmentation on the consumer; both get the same CPU budget (``workers`` reader processes). The
Ray side is exactly what a training worker sees: :class:`~cliplung.data.ingest.NoduleDatasource`
read tasks, ``iter_torch_batches`` with a local shuffle buffer.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from cliplung.config import load_config
from cliplung.data.augment import augment_batch, epoch_generator
from cliplung.data.store import NoduleStore

__all__ = ["bench_ingest"]


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
            "patches": torch.from_numpy(np.asarray(row["patches"][0], dtype=np.float32)),
            "label": int(row["label"][0]),
            "attributes": torch.from_numpy(np.asarray(row["attributes"][0], dtype=np.float32)),
        }


def _consume(batches, cfg, epochs_seed: int) -> int:
    gen = epoch_generator(0, epochs_seed, 0)
    n = 0
    for batch in batches:
        augment_batch(batch["patches"], gen, cfg)
        n += batch["patches"].shape[0]
    return n


def bench_ingest(
    store: str, batch: int = 32, epochs: int = 2, workers: int = 2, as_json: bool = False
) -> dict:
    from cliplung.cluster import ensure_ray
    from cliplung.data.ingest import NoduleDatasource, compute_splits

    config = load_config("debug", [f"data.store={store}"])
    opened = NoduleStore.open(store)
    rows = compute_splits(opened, config.data).train
    aug = config.train.augment

    loader = torch.utils.data.DataLoader(
        _StoreRows(store, rows),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(0),
    )
    _consume(loader, aug, 0)  # warm-up: worker start, page cache
    start = time.perf_counter()
    n_loader = sum(_consume(loader, aug, e) for e in range(epochs))
    loader_rate = n_loader / (time.perf_counter() - start)

    ensure_ray(num_cpus=workers)
    import ray.data

    ds = ray.data.read_datasource(NoduleDatasource(store, rows, endpoint=None, task=config.data.task))

    def ray_epoch(e: int) -> int:
        it = ds.iter_torch_batches(
            batch_size=batch, drop_last=True, local_shuffle_buffer_size=len(rows), local_shuffle_seed=e
        )
        return _consume(it, aug, e)

    ray_epoch(0)
    start = time.perf_counter()
    n_ray = sum(ray_epoch(e) for e in range(epochs))
    ray_rate = n_ray / (time.perf_counter() - start)

    result = {
        "store": store,
        "rows": len(rows),
        "patch_shape": list(opened.attrs.get("patch_shape", [])) or int(opened.attrs.get("patch_size", 0)),
        "batch": batch,
        "epochs": epochs,
        "reader_processes": workers,
        "ray_data_patches_per_s": round(ray_rate, 1),
        "dataloader_patches_per_s": round(loader_rate, 1),
        "ratio_ray_over_dataloader": round(ray_rate / loader_rate, 3),
    }
    print(json.dumps(result, indent=None if as_json else 2))
    return result
