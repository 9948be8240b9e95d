"""Ray Data ingest of a nodule store: split selection, a zarr-3 datasource, per-worker shards.

Why a datasource of our own rather than ``ray.data.read_zarr``: Ray's reader needs zarr-python 2
and Zarr format 2 stores, while the nodule store is Zarr format 3 with sharding (one chunk per
nodule, many nodules per object), which is what keeps object-storage reads few and large. The
datasource below reads row ranges through :class:`~cliplung.data.store.NoduleStore`, so local
and ``s3://`` stores read the same way.

Splits (all patient-level, so a patient's nodules are never on both sides of a split):

* **test**: the rows of fold ``data.test_fold``; only ``cliplung evaluate`` reads it.
* **val**: ``data.val_fraction`` of the remaining patients (seeded by ``data.split_seed``); used
  for model selection every epoch.
* **train**: everything else.

Labels come from each nodule's mean malignancy under ``data.unsure_range`` (:mod:`cliplung.labels`).
Training and validation rows are those of ``data.task`` (``2class`` drops unsure nodules and
malignant becomes label 1); the test rows are those of ``data.test_task`` (default: the same).

Sharding: :class:`DeterministicShards` gives every Ray Train worker an equal, fixed share of the
training rows (``Dataset.split(equal=True)``) instead of Train's default ``streaming_split``,
whose block-to-worker assignment depends on which worker asks first. With fixed shards and a
per-epoch shuffle seeded by (seed, epoch, rank), a run is reproducible for a seed and worker count,
and a resumed run replays its interrupted epoch exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import ray.data
import ray.train
from ray.data import Datasource
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import ReadTask

from cliplung.config import Config, ConfigError, DataConfig
from cliplung.data.preprocessing import check_preprocessing, store_preprocessing
from cliplung.data.store import NoduleStore
from cliplung.labels import DEFAULT_UNSURE_RANGE, store_labels, task_labels, task_rows

__all__ = [
    "DeterministicShards",
    "NoduleDatasource",
    "Splits",
    "build_datasets",
    "compute_splits",
    "open_training_store",
]

# Columns each row carries into training; patches are float32 (D, H, W) in [0, 1].
ROW_FIELDS = ("patches", "malignancy", "attributes")


@dataclass(frozen=True)
class Splits:
    """Row indices (into the store) of each split, sorted, plus the patients in each."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    train_patients: tuple[str, ...]
    val_patients: tuple[str, ...]
    test_patients: tuple[str, ...]

    def record(self, store: str) -> dict:
        """What a run writes once into its ``splits.json``: counts, the store, every split's rows
        and the test patients (evaluation proves isolation from it)."""
        return {
            **self.summary(),
            "store": store,
            "train_rows": self.train.tolist(),
            "val_rows": self.val.tolist(),
            "test_rows": self.test.tolist(),
            "test_patients": list(self.test_patients),
        }

    def summary(self) -> dict[str, int]:
        return {
            "train_nodules": len(self.train),
            "val_nodules": len(self.val),
            "test_nodules": len(self.test),
            "train_patients": len(self.train_patients),
            "val_patients": len(self.val_patients),
            "test_patients": len(self.test_patients),
        }


def compute_splits(store: NoduleStore, data: DataConfig) -> Splits:
    """Patient-level train / val / test row indices for ``data`` (see the module docstring)."""
    meta = store.read_rows(0, store.num_nodules, fields=("fold", "patient_id", "malignancy"))
    folds = np.asarray(meta["fold"]).astype(np.int64)
    patients = np.asarray(meta["patient_id"]).astype(str)
    labels = store_labels(meta, data.unsure_range)
    n_folds = int(folds.max()) + 1 if len(folds) else 0
    if not 0 <= data.test_fold < n_folds:
        raise ConfigError(
            f"data.test_fold: store {store.path} has folds 0..{n_folds - 1}, got {data.test_fold}"
        )
    keep = task_rows(labels, data.task)
    test_mask = task_rows(labels, data.scored_task) & (folds == data.test_fold)
    rest = keep & (folds != data.test_fold)
    rest_patients = np.unique(patients[rest])
    rng = np.random.default_rng(data.split_seed)
    shuffled = rng.permutation(rest_patients)
    n_val = max(1, round(len(shuffled) * data.val_fraction))
    if n_val >= len(shuffled):
        raise ConfigError(
            f"data.val_fraction: store {store.path} has only {len(shuffled)} training patients, "
            f"too few to hold out {data.val_fraction:.0%} for validation"
        )
    val_patients = np.sort(shuffled[:n_val])
    val_mask = rest & np.isin(patients, val_patients)
    train_mask = rest & ~val_mask
    return Splits(
        train=np.flatnonzero(train_mask),
        val=np.flatnonzero(val_mask),
        test=np.flatnonzero(test_mask),
        train_patients=tuple(np.unique(patients[train_mask]).tolist()),
        val_patients=tuple(val_patients.tolist()),
        test_patients=tuple(np.unique(patients[test_mask]).tolist()),
    )


def _runs(indices: np.ndarray, max_rows: int) -> list[np.ndarray]:
    """Group sorted row indices into pieces of at most ``max_rows`` spanning few store shards."""
    return [indices[i : i + max_rows] for i in range(0, len(indices), max_rows)]


class NoduleDatasource(Datasource):
    """A Ray Data datasource yielding one row per nodule for the given store rows.

    Rows carry ``patches`` (float32, D x H x W), ``label`` (int64: the rule of ``unsure_range``
    on the stored mean malignancy, remapped for the 2-class task), ``attributes`` (float32, 8 mean
    reader ratings) and ``index`` (the store row).
    ``store`` is an open :class:`NoduleStore` or a path (opened here, on the driver): every read
    task reads that store's version, even if the store is replaced while the dataset is read, and
    each task reads one contiguous row range, i.e. a few whole shards. Store reads retry transient
    object-store errors with bounded backoff (see :mod:`cliplung.data.store`), so a short outage
    costs a few seconds of waiting rather than a failed task (and with it the training run's
    worker group).
    """

    def __init__(
        self,
        store: NoduleStore | str,
        indices: np.ndarray,
        *,
        endpoint: str | None = None,
        task: str,
        unsure_range: tuple[float, float] = DEFAULT_UNSURE_RANGE,
        rows_per_task: int = 256,
    ) -> None:
        super().__init__()
        self._store = store if isinstance(store, NoduleStore) else NoduleStore.open(store, endpoint=endpoint)
        self._unsure_range = tuple(unsure_range)
        self._indices = np.asarray(indices, dtype=np.int64)
        self._task = task
        self._rows_per_task = rows_per_task

    def get_name(self) -> str:
        return "NoduleStore"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        if len(self._indices) == 0:
            return []
        per_task = max(1, min(self._rows_per_task, -(-len(self._indices) // max(1, parallelism))))
        return [
            ReadTask(
                functools.partial(_read_rows, self._store, self._task, self._unsure_range, piece),
                BlockMetadata(num_rows=len(piece), size_bytes=None, input_files=None, exec_stats=None),
                per_task_row_limit=per_task_row_limit,
            )
            for piece in _runs(self._indices, per_task)
        ]


def _read_rows(store: NoduleStore, task: str, unsure_range, piece: np.ndarray):
    # ``store`` arrives pickled: pinned to the driver's version, opened lazily in this task.
    rows = store.read_rows(int(piece[0]), int(piece[-1]) + 1, fields=ROW_FIELDS)
    local = piece - piece[0]
    label = task_labels(store_labels(rows, unsure_range)[local], task)
    yield BlockAccessor.batch_to_block(
        {
            "patches": np.asarray(rows["patches"])[local].astype(np.float32),
            "label": label,
            "attributes": np.asarray(rows["attributes"], dtype=np.float32)[local],
            "index": piece.astype(np.int64),
        }
    )


def open_training_store(config: Config) -> tuple[NoduleStore, Splits]:
    """Open and validate the run's store and compute its splits; runs on the driver before Ray
    starts, so a bad store or config fails before any worker does."""
    store = NoduleStore.open(config.data.store, endpoint=config.storage.endpoint)
    store.validate()
    _check_store_matches(store, config)
    splits = compute_splits(store, config.data)
    if len(splits.train) // config.train.workers < config.train.micro_batch_size:
        raise ConfigError(
            f"train.batch_size: {config.train.batch_size} needs at least {config.train.batch_size} "
            f"training nodules, but the training split of {store.path} has {len(splits.train)}"
        )
    if len(splits.val) == 0:
        raise ConfigError(f"data.val_fraction: the validation split of {store.path} is empty")
    return store, splits


READ_CONCURRENCY = 2
"""Read tasks of one dataset in flight at once."""


def build_datasets(config: Config, store: NoduleStore, splits: Splits) -> dict[str, ray.data.Dataset]:
    """Ray datasets ``{"train", "val"}`` over the store rows of each split.

    Read tasks reserve no CPU and at most ``READ_CONCURRENCY`` run at once: Ray Train splits the
    datasets after its workers hold their CPUs, so reads that asked for a CPU of their own would
    wait forever on a cluster the workers fill (two 1-CPU nodes, two workers). They are short and
    mostly wait on storage, so sharing the workers' cores costs little.
    """
    return {
        name: ray.data.read_datasource(
            NoduleDatasource(
                store, getattr(splits, name), task=config.data.task, unsure_range=config.data.unsure_range
            ),
            num_cpus=0,
            concurrency=READ_CONCURRENCY,
        )
        for name in ("train", "val")
    }


def _check_store_matches(store: NoduleStore, config: Config) -> None:
    """The config's ``prepare`` section must describe how the store's patches were cut: the
    checkpoint carries this config, and ``cliplung predict`` cuts new patches with it."""
    check_preprocessing(store_preprocessing(store), config.prepare, source=f"store {store.path}")


class DeterministicShards(ray.train.DataConfig):
    """Splits ``train`` into fixed, equal per-worker shards (``Dataset.split(equal=True)``).

    ``val`` is split without dropping rows, so every validation nodule is scored exactly once
    (metrics are gathered across workers).
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output: list[dict] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            # Train's default ingest options (carried over from the driver's DataContext), with the
            # row order kept: a shard's content must not depend on which read task finished first.
            options = self.default_ingest_options()
            options.preserve_order = True
            ds.context.execution_options = options
            for rank, piece in enumerate(ds.split(world_size, equal=(name == "train"))):
                output[rank][name] = piece.iterator()
        return output
