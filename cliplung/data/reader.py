"""Reading blocks of training rows from a nodule store, in a process that needs nothing else.

A streaming training worker reads its blocks through reader actors of its own
(:class:`cliplung.data.ingest.StreamData`). Ray starts each actor in a fresh worker process and
imports the module its class is defined in, so that module decides what every reader costs to
start and to keep: this one imports numpy, zarr (through :mod:`cliplung.data.store`) and
:mod:`cliplung.labels`, not torch, Ray Data or the model. Measured (``README.md``, training input):
each reader peaked at 680-790 MiB resident while the class lived in :mod:`cliplung.data.ingest`,
which imports torch and Ray Data, and at about 140 MiB since; a 2-worker 1-epoch streaming run
starts about 5 s sooner on 2 cores.
"""

from __future__ import annotations

import numpy as np

from cliplung.data.store import NoduleStore
from cliplung.labels import DEFAULT_UNSURE_RANGE, store_labels, task_labels

__all__ = ["ROW_FIELDS", "BlockReader", "read_block"]

# Columns each row carries into training; patches are float16 (D, H, W) in [0, 1] until the
# worker's device converts them; the label comes from the mean malignancy and the run's unsure
# range (cliplung.labels).
ROW_FIELDS = ("patches", "malignancy", "attributes")


def read_block(
    store: NoduleStore, task: str, piece: np.ndarray, unsure_range=DEFAULT_UNSURE_RANGE
) -> dict[str, np.ndarray]:
    """The store rows ``piece`` (sorted) in one contiguous read: ``patches`` float16, ``label``
    (from the mean malignancy by ``unsure_range``, remapped for ``task``), ``attributes`` float32,
    ``index`` (the store rows). Retries transient object-store errors (:mod:`cliplung.data.store`)."""
    rows = store.read_rows(int(piece[0]), int(piece[-1]) + 1, fields=ROW_FIELDS)
    local = piece - piece[0]
    return {
        "patches": np.ascontiguousarray(np.asarray(rows["patches"])[local], dtype=np.float16),
        "label": task_labels(store_labels(rows, unsure_range)[local], task).astype(np.int64),
        "attributes": np.asarray(rows["attributes"], dtype=np.float32)[local],
        "index": piece.astype(np.int64),
    }


class BlockReader:
    """A reader process of a streaming worker (one Ray actor each, for the whole run: its imports
    and open store are paid once, not per epoch or per block)."""

    def __init__(self, store: NoduleStore, task: str, unsure_range=DEFAULT_UNSURE_RANGE) -> None:
        self.store, self.task, self.unsure_range = store, task, unsure_range

    def read(self, piece: np.ndarray) -> dict[str, np.ndarray]:
        return read_block(self.store, self.task, piece, self.unsure_range)
