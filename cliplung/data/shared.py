"""One split's training and validation data, read once and shared by every run trained on it.

``cliplung compare`` trains several methods on the same folds: every method's fold ``k`` has the
same store, the same patient-level split and the same labels, so the rows its workers read are the
same. Each run reading them again through its own Ray Data read tasks costs more than the reading
itself: every read task starts in a fresh Ray worker process (about 20 s per run on two busy cores
for the debug preset's ~2,100 training and validation nodules, more than a debug epoch).
:class:`SharedSplitData` reads the rows once, in the process that builds it, into blocks in Ray's
object store (``ray.data.from_arrow``: a materialised dataset, no read task), and
:func:`cliplung.train.trainer.train` takes its datasets instead of building its own when the
split it computed is the one the data was read for (else it refuses: a run never trains on rows
its own split would not give it).

The rows, their order and their values are those of :class:`cliplung.data.ingest.NoduleDatasource`
(the same function reads them); the blocks hold ``BLOCK_ROWS`` rows each.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from cliplung.config import Config
from cliplung.data.ingest import Splits, _read_rows
from cliplung.data.store import NoduleStore

__all__ = ["BLOCK_ROWS", "SharedSplitData", "split_key"]

BLOCK_ROWS = 256


def split_key(config: Config, splits: Splits) -> str:
    """What makes two runs read the same rows with the same labels: the store, the label rule and
    task, and the training and validation rows."""
    digest = hashlib.sha256()
    d = config.data
    digest.update(f"{d.store}|{d.task}|{list(d.unsure_range)}|".encode())
    for rows in (splits.train, splits.val):
        digest.update(np.asarray(rows, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


class SharedSplitData:
    """The ``train`` and ``val`` datasets of one split, materialised once (module docstring)."""

    def __init__(self, config: Config, store: NoduleStore, splits: Splits) -> None:
        import ray.data

        self.key = split_key(config, splits)
        self.datasets: dict[str, Any] = {}
        for name in ("train", "val"):
            rows = np.asarray(getattr(splits, name), dtype=np.int64)
            blocks = [
                block
                for start in range(0, len(rows), BLOCK_ROWS)
                for block in _read_rows(
                    store, config.data.task, config.data.unsure_range, rows[start : start + BLOCK_ROWS]
                )
            ]
            self.datasets[name] = ray.data.from_arrow(blocks)

    def datasets_for(self, config: Config, splits: Splits) -> dict[str, Any]:
        """The datasets, for a run whose split is ``splits``; ValueError when it is another one."""
        if split_key(config, splits) != self.key:
            raise ValueError(
                f"run {config.name}: the shared data was read for another split, store or label rule "
                "than this run's; it would train on rows its own split does not give it"
            )
        return dict(self.datasets)
