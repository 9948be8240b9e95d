"""One split's training and validation rows, read once and shared by every run trained on it.

``cliplung compare`` trains several methods on the same folds: every method's fold ``k`` has the
same store, the same patient-level split and the same labels, so the rows its workers get are the
same. :class:`SharedSplitData` reads them once, in the process that builds it (the rows, their
order and values are those of :func:`cliplung.data.ingest.read_rows_in_blocks`, the function every
run's own read uses), and keeps them in Ray's object store; :func:`cliplung.train.trainer.train`
cuts its workers' in-memory shards from them instead of reading the store again, when the split it
computed is the one the data was read for (else it refuses: a run never trains on rows its own
split would not give it). A run in ``stream`` mode reads its own blocks (the store is too big to
hold, which is what streaming is for).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from cliplung.config import Config
from cliplung.data.ingest import Splits, read_rows_in_blocks
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
    """The ``train`` and ``val`` rows of one split, read once (module docstring)."""

    def __init__(self, config: Config, store: NoduleStore, splits: Splits) -> None:
        import ray

        self.key = split_key(config, splits)
        d = config.data
        self._refs: dict[str, Any] = {
            name: ray.put(
                read_rows_in_blocks(
                    store, d.task, np.asarray(getattr(splits, name), np.int64), BLOCK_ROWS, d.unsure_range
                )
            )
            for name in ("train", "val")
        }

    def arrays_for(self, config: Config, splits: Splits) -> dict[str, dict[str, np.ndarray]]:
        """The rows (``train``, ``val``: column arrays in split order) for a run whose split is
        ``splits``; ValueError when it is another one."""
        import ray

        self.check(config, splits)
        return {name: ray.get(ref) for name, ref in self._refs.items()}

    def check(self, config: Config, splits: Splits) -> None:
        """ValueError unless ``splits`` (and the run's store and label rule) are this data's."""
        if split_key(config, splits) != self.key:
            raise ValueError(
                f"run {config.name}: the shared data was read for another split, store or label rule "
                "than this run's; it would train on rows its own split does not give it"
            )
