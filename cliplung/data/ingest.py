"""Training input from a nodule store: split selection, per-worker shards in memory or streamed,
and a zarr-3 Ray Data datasource (for ``cliplung predict``).

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

Training input (``data.ingest``, chosen once per run on the driver by :func:`ingest_mode`):

* **memory** (stores whose training and validation rows fit ``data.memory_budget_mb`` as float16):
  the driver reads those rows once, in contiguous blocks, and puts each worker's fixed shard into
  Ray's object store as float16 (:func:`build_data_plan`). A worker collects its shard once per run
  (in its first epoch), keeps it on its device, and every epoch lays it out in that epoch's order
  (a permutation drawn from (seed, epoch, rank)) and slices micro-batches from the layout; the next
  epoch's layout is gathered while the current epoch trains (:class:`MemoryData`). No Ray Data, no
  task, nothing read per epoch; a worker holds its training shard twice (this epoch's layout and
  the next one's).
* **stream** (larger stores): each worker reads its fixed shard every epoch in blocks of
  ``data.stream_block_rows`` rows, in a block order drawn from (seed, epoch, rank), through
  ``data.stream_readers`` reader actors of its own (started once per run, no CPU reserved, one
  read in flight each) that read the next blocks while the current ones train;
  ``data.stream_window_blocks`` blocks are pooled and shuffled together. A worker holds at most
  (window + readers) blocks of rows (:func:`stream_memory_bytes`).

Shards are fixed: rank ``r`` of ``w`` gets the ``r``-th of ``w`` equal contiguous pieces of the
sorted training rows (:func:`rank_rows`; the remainder is dropped so every worker runs the same
number of steps) and the ``r``-th of ``w`` near-equal pieces of the validation rows (none dropped,
every validation nodule is scored once). With fixed shards and an epoch order that is a function of
(seed, epoch, rank), a run is reproducible for a seed and worker count, and a resumed run replays
its interrupted epoch exactly, in either mode. Reads reserve no CPU in any mode: on a cluster the
training workers can hold every CPU, and reads that wait for one of their own would wait forever.

:class:`NoduleDatasource` (a Ray Data datasource) serves ``cliplung predict``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import ray
import torch
from ray.data import Datasource
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import ReadTask

from cliplung.config import Config, ConfigError, DataConfig
from cliplung.data.augment import to_device
from cliplung.data.preprocessing import check_preprocessing, store_preprocessing
from cliplung.data.reader import BlockReader, read_block
from cliplung.data.store import NoduleStore
from cliplung.labels import DEFAULT_UNSURE_RANGE, store_labels, task_rows

__all__ = [
    "DataPlan",
    "MemoryData",
    "NoduleDatasource",
    "Splits",
    "StreamData",
    "build_data_plan",
    "compute_splits",
    "in_memory_bytes",
    "ingest_mode",
    "open_training_store",
    "rank_rows",
    "read_block",
    "read_rows_in_blocks",
    "shuffle_generator",
    "stream_memory_bytes",
]

ROW_EXTRA_BYTES = 8 * 4 + 8 + 8
"""Bytes of a row besides its patch: 8 float32 attributes, the int64 label and store index."""


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
    block = read_block(store, task, piece, unsure_range)
    block["patches"] = block["patches"].astype(np.float32)
    yield BlockAccessor.batch_to_block(block)


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


def _check_store_matches(store: NoduleStore, config: Config) -> None:
    """The config's ``prepare`` section must describe how the store's patches were cut: the
    checkpoint carries this config, and ``cliplung predict`` cuts new patches with it."""
    check_preprocessing(store_preprocessing(store), config.prepare, source=f"store {store.path}")


# --------------------------------------------------------------------------- training input


def rank_rows(rows: np.ndarray, rank: int, world: int, *, equal: bool) -> np.ndarray:
    """Rank ``rank``'s fixed share of the sorted ``rows``: the ``rank``-th of ``world`` contiguous
    pieces, equal in length (``equal``, the remainder dropped) or near-equal (none dropped)."""
    if equal:
        per = len(rows) // world
        return rows[rank * per : (rank + 1) * per]
    return np.array_split(rows, world)[rank]


def shuffle_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The generator of a worker's data order in an epoch: a function of (seed, epoch, rank) only,
    and a stream apart from the augmentation's (:func:`cliplung.data.augment.epoch_generator`)."""
    digest = hashlib.blake2b(f"order|{seed}|{epoch}|{rank}".encode(), digest_size=8).digest()
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest, "little") % (2**63 - 1))
    return gen


def _row_bytes(store: NoduleStore) -> int:
    p = int(store.attrs.get("patch_size", 0)) or int(store.array("patches").shape[1])
    return p**3 * 2 + ROW_EXTRA_BYTES


def in_memory_bytes(store: NoduleStore, splits: Splits) -> int:
    """Bytes the training and validation rows take in memory (float16 patches)."""
    return (len(splits.train) + len(splits.val)) * _row_bytes(store)


def stream_memory_bytes(store: NoduleStore, data: DataConfig) -> int:
    """The most row bytes a streaming worker holds: its shuffle window plus the blocks in flight
    (and as much again while a window is turned into device tensors)."""
    return (data.stream_window_blocks + data.stream_readers) * data.stream_block_rows * _row_bytes(store)


def ingest_mode(config: Config, store: NoduleStore, splits: Splits) -> str:
    """``memory`` or ``stream`` for this run (``data.ingest``; ``auto`` by the memory budget)."""
    if config.data.ingest != "auto":
        return config.data.ingest
    fits = in_memory_bytes(store, splits) <= config.data.memory_budget_mb * 2**20
    return "memory" if fits else "stream"


def _concat(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def _to_tensors(block: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    # np.array copies: object-store arrays are read-only, and the copy is the worker's own.
    return {k: to_device(torch.from_numpy(np.array(v)), device) for k, v in block.items()}


def _views(tensors: dict[str, torch.Tensor], size: int, *, drop_last: bool):
    n = len(tensors["label"])
    stop = n - n % size if drop_last else n
    for start in range(0, stop, size):
        yield {k: v[start : start + size] for k, v in tensors.items()}


class _Background:
    """``fn()`` run in a daemon thread; :meth:`result` waits for it and returns its value or
    raises its error in the caller."""

    def __init__(self, fn) -> None:
        self._value, self._error = None, None
        # torch's intra-op thread count (the worker's CPUs) carries over into the thread.
        self._thread = threading.Thread(target=self._run, args=(fn,), name="cliplung-next-epoch", daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as err:  # re-raised in the caller by result()
            self._error = err

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


@dataclass(frozen=True)
class _EpochLayout:
    """A worker's training shard permuted into one epoch's order: ``tensors[i]`` is the shard's row
    ``order[i]``, so the epoch's micro-batches are contiguous slices."""

    order: torch.Tensor
    tensors: dict[str, torch.Tensor]

    def permuted(self, order: torch.Tensor, *, background: bool = False):
        """A callable that returns the layout of another ``order`` over the shard's rows, gathered
        from this one. ``background``: the patches (nearly all the bytes) are gathered in a
        :class:`_Background` thread, with one call into torch there, so that the thread holds
        Python's lock as little as it can; the small fields are gathered here."""
        where = torch.empty_like(self.order)
        where[self.order] = torch.arange(len(self.order), device=self.order.device)
        rows = where.index_select(0, order)
        small = {k: v.index_select(0, rows) for k, v in self.tensors.items() if k != "patches"}
        patches = self.tensors["patches"]
        if background:
            gather = _Background(functools.partial(patches.index_select, 0, rows))
            return lambda: _EpochLayout(order, {"patches": gather.result(), **small})
        layout = _EpochLayout(order, {"patches": patches.index_select(0, rows), **small})
        return lambda: layout


class MemoryData:
    """A worker's training input in ``memory`` mode: its shards (object-store refs) collected onto
    ``device`` at first use, reshuffled per epoch by :func:`shuffle_generator`.

    Each epoch's order is laid out once (:class:`_EpochLayout`): the shard gathered into that
    order, its micro-batches then contiguous slices, with no gather per batch (on a GPU, three
    kernels an epoch instead of three a batch). While an epoch trains, the next epoch's layout is
    gathered from the current one, on a host device in a background thread (on a GPU the gathers
    are asynchronous already), so the first batch of an epoch does not wait for it. A worker holds
    two copies of its training shard: the current epoch's and the next one's. The batches are the
    rows ``order[i * micro : (i + 1) * micro]`` of the shard whichever epoch came before, so a
    replayed or resumed epoch is the same epoch."""

    def __init__(self, train_ref, val_ref, *, seed: int, rank: int, device: torch.device) -> None:
        self._refs = {"train": train_ref, "val": val_ref}
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._layout: _EpochLayout | None = None
        self._next: tuple[int, Callable[[], _EpochLayout]] | None = None
        self.seed, self.rank, self.device = seed, rank, torch.device(device)

    @classmethod
    def of_arrays(cls, train: dict, val: dict, *, seed: int, rank: int, device="cpu") -> MemoryData:
        """From host arrays (no Ray): what a worker would hold (tests, benchmarks)."""
        data = cls(None, None, seed=seed, rank=rank, device=torch.device(device))
        data._tensors = {"train": _to_tensors(train, data.device), "val": _to_tensors(val, data.device)}
        return data

    def _split(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._tensors:
            self._tensors[name] = _to_tensors(ray.get(self._refs[name]), self.device)
            self._refs[name] = None  # the worker's copy is what it reads from now on
        return self._tensors[name]

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s order of the shard's rows, on the device."""
        n = len(self._layout.order) if self._layout is not None else len(self._split("train")["label"])
        return to_device(
            torch.randperm(n, generator=shuffle_generator(self.seed, epoch, self.rank)), self.device
        )

    def _epoch_layout(self, epoch: int) -> _EpochLayout:
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == epoch:
            layout = ahead[1]()
        else:  # the run's first epoch, or one out of turn (a replay)
            if ahead is not None:
                ahead[1]()  # not left running beside this epoch's gather
            if self._layout is None:
                shard = self._split("train")
                del self._tensors["train"]  # the layouts hold the rows from now on
                self._layout = _EpochLayout(torch.arange(len(shard["label"]), device=self.device), shard)
                del shard
            layout = self._layout.permuted(self.epoch_order(epoch))()
        self._layout = layout  # the layout it came from is freed here
        # On a GPU the gathers are asynchronous kernels already: no thread.
        ready = layout.permuted(self.epoch_order(epoch + 1), background=self.device.type == "cpu")
        self._next = (epoch + 1, ready)
        return layout

    def train_batches(self, epoch: int, micro: int) -> Iterator[dict[str, torch.Tensor]]:
        """Epoch ``epoch``'s micro-batches (every one full), on the device."""
        yield from _views(self._epoch_layout(epoch).tensors, micro, drop_last=True)

    def val_batches(self, size: int) -> Iterator[dict[str, torch.Tensor]]:
        yield from _views(self._split("val"), size, drop_last=False)


@functools.cache
def _reader_actor():
    # No CPU of its own (see the module docstring); restarted, with its call retried, if it dies.
    return ray.remote(num_cpus=0, max_restarts=3, max_task_retries=3)(BlockReader)


class StreamData:
    """A worker's training input in ``stream`` mode: its fixed shard read every epoch, block by
    block, by reader actors running ahead of the steps (see the module docstring)."""

    def __init__(
        self,
        store: NoduleStore,
        task: str,
        train_rows: np.ndarray,
        val_rows: np.ndarray,
        *,
        seed: int,
        rank: int,
        device: torch.device,
        block_rows: int,
        readers: int,
        window: int,
        unsure_range=DEFAULT_UNSURE_RANGE,
    ) -> None:
        self.store, self.task, self.unsure_range = store, task, unsure_range
        self.rows = {"train": np.asarray(train_rows, np.int64), "val": np.asarray(val_rows, np.int64)}
        self.seed, self.rank, self.device = seed, rank, torch.device(device)
        self.block_rows, self.readers, self.window = block_rows, readers, window
        self._actors: list | None = None

    def _blocks(self, pieces: list[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """The blocks of ``pieces`` in that order; ``readers`` reads in flight ahead of the one
        being consumed, block ``i`` read by reader ``i % readers``."""
        if self._actors is None:
            actor = _reader_actor()
            self._actors = [
                actor.remote(self.store, self.task, self.unsure_range) for _ in range(self.readers)
            ]
        ahead = enumerate(pieces)
        pending: collections.deque = collections.deque()

        def submit() -> None:
            item = next(ahead, None)
            if item is not None:
                i, piece = item
                pending.append(self._actors[i % self.readers].read.remote(piece))

        for _ in range(self.readers):
            submit()
        while pending:
            ref = pending.popleft()
            submit()
            yield ray.get(ref)

    def epoch_pieces(self, epoch: int) -> list[np.ndarray]:
        """This worker's blocks of training rows in epoch ``epoch``'s order."""
        pieces = _runs(self.rows["train"], self.block_rows)
        order = torch.randperm(len(pieces), generator=shuffle_generator(self.seed, epoch, self.rank))
        return [pieces[i] for i in order.tolist()]

    def train_batches(self, epoch: int, micro: int) -> Iterator[dict[str, torch.Tensor]]:
        gen = shuffle_generator(self.seed, epoch + 1_000_003, self.rank)  # within-window order
        pieces = self.epoch_pieces(epoch)
        pool: list[dict[str, np.ndarray]] = []
        for i, block in enumerate(self._blocks(pieces)):
            pool.append(block)
            if len(pool) < self.window and i < len(pieces) - 1:
                continue
            rows = _concat(pool)
            n = len(rows["label"])
            keep = n - n % micro
            perm = torch.randperm(n, generator=gen).numpy()
            # Rows past the last full micro-batch carry over into the next window.
            pool = [{k: v[perm[keep:]] for k, v in rows.items()}] if keep < n else []
            if keep:
                tensors = _to_tensors({k: v[perm[:keep]] for k, v in rows.items()}, self.device)
                yield from _views(tensors, micro, drop_last=True)

    def val_batches(self, size: int) -> Iterator[dict[str, torch.Tensor]]:
        for block in self._blocks(_runs(self.rows["val"], self.block_rows)):
            yield from _views(_to_tensors(block, self.device), size, drop_last=False)


@dataclass(frozen=True)
class DataPlan:
    """What the driver hands every training worker (``train_loop_config["data"]``)."""

    mode: str
    seed: int
    task: str
    train_rows: np.ndarray
    val_rows: np.ndarray
    store: NoduleStore | None = None
    """``stream``: the store, pinned to the driver's version."""
    refs: tuple = ()
    """``memory``: per rank, the object-store refs of its (train, val) shards."""
    block_rows: int = 256
    readers: int = 2
    window: int = 4
    unsure_range: tuple[float, float] = DEFAULT_UNSURE_RANGE

    def for_worker(self, rank: int, world: int, device: torch.device) -> MemoryData | StreamData:
        if self.mode == "memory":
            train_ref, val_ref = self.refs[rank]
            return MemoryData(train_ref, val_ref, seed=self.seed, rank=rank, device=device)
        return StreamData(
            self.store,
            self.task,
            rank_rows(self.train_rows, rank, world, equal=True),
            rank_rows(self.val_rows, rank, world, equal=False),
            seed=self.seed,
            rank=rank,
            device=device,
            block_rows=self.block_rows,
            readers=self.readers,
            window=self.window,
            unsure_range=self.unsure_range,
        )


def read_rows_in_blocks(
    store: NoduleStore, task: str, rows: np.ndarray, block_rows: int, unsure_range=DEFAULT_UNSURE_RANGE
) -> dict[str, np.ndarray]:
    """The store rows ``rows`` (sorted), read ``block_rows`` at a time, as one block."""
    if len(rows) == 0:
        return _empty_block(store)
    return _concat([read_block(store, task, piece, unsure_range) for piece in _runs(rows, block_rows)])


def _empty_block(store: NoduleStore) -> dict[str, np.ndarray]:
    p = int(store.attrs.get("patch_size", 0)) or int(store.array("patches").shape[1])
    return {
        "patches": np.zeros((0, p, p, p), np.float16),
        "label": np.zeros(0, np.int64),
        "attributes": np.zeros((0, 8), np.float32),
        "index": np.zeros(0, np.int64),
    }


def build_data_plan(
    config: Config, store: NoduleStore, splits: Splits, mode: str | None = None, shared=None
) -> DataPlan:
    """The run's :class:`DataPlan`; in ``memory`` mode this reads the rows and puts every worker's
    shards into Ray's object store (Ray must be running). Reads here run on the driver, once per
    run, and retry transient object-store errors. ``shared``: a
    :class:`cliplung.data.shared.SharedSplitData` already read for this split (``compare``), whose
    rows the shards are cut from instead of reading them again (``memory`` mode only)."""
    d, world = config.data, config.train.workers
    mode = mode or ingest_mode(config, store, splits)
    plan = DataPlan(
        mode=mode,
        seed=config.train.seed,
        task=d.task,
        train_rows=splits.train,
        val_rows=splits.val,
        block_rows=d.stream_block_rows,
        readers=d.stream_readers,
        window=d.stream_window_blocks,
        unsure_range=tuple(d.unsure_range),
    )
    if mode == "stream":
        if shared is not None:
            shared.check(config, splits)
        return dataclasses.replace(plan, store=store)
    source = shared.arrays_for(config, splits) if shared is not None else None
    refs = []
    for rank in range(world):
        shards = []
        for name, rows, equal in (("train", splits.train, True), ("val", splits.val, False)):
            mine = rank_rows(rows, rank, world, equal=equal)
            if source is None:
                shard = read_rows_in_blocks(store, d.task, mine, d.stream_block_rows, d.unsure_range)
            else:  # the split's rows are sorted and this rank's share is a run of them
                where = np.searchsorted(rows, mine)
                shard = {k: v[where] for k, v in source[name].items()}
            shards.append(shard)
        refs.append(tuple(ray.put(shard) for shard in shards))
    return dataclasses.replace(plan, refs=tuple(refs))
