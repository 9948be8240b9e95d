"""Split isolation: which store rows a fold is, and proof that a model never saw them.

A run records its patient-level splits once, in ``splits.json`` (:mod:`cliplung.runs`). Before a
test fold is scored, :func:`check_split_isolation` proves from that record that no nodule or
patient of the fold was trained or validated on; a leak is a :class:`SplitLeakError` naming the
first offender (the work failed: exit 1, since the input is not what is wrong).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cliplung import storage as storage_lib
from cliplung.config import ConfigError
from cliplung.data.store import NoduleStore
from cliplung.labels import DEFAULT_UNSURE_RANGE, store_labels, task_labels, task_rows
from cliplung.runs import SPLITS_FILE, CheckpointChoice

__all__ = ["SplitLeakError", "check_split_isolation", "fold_rows", "split_check"]


class SplitLeakError(RuntimeError):
    """A test-fold nodule or patient took part in training or validation."""


def fold_rows(
    store: NoduleStore, fold: int, task: str, unsure_range: tuple[float, float] = DEFAULT_UNSURE_RANGE
) -> tuple[np.ndarray, np.ndarray]:
    """Store rows of fold ``fold`` and their labels as the task's class indices, under the label
    rule of ``unsure_range``.

    ``2class`` drops unsure nodules and maps malignant to 1, exactly as the test split of
    :func:`cliplung.data.ingest.compute_splits` and its datasource do.
    """
    meta = store.read_rows(0, store.num_nodules, fields=("fold", "malignancy"))
    folds = np.asarray(meta["fold"]).astype(np.int64)
    labels = store_labels(meta, unsure_range)
    n_folds = int(folds.max()) + 1 if len(folds) else 0
    if not 0 <= fold < n_folds:
        raise ConfigError(f"--fold: store {store.path} has folds 0..{n_folds - 1}, got {fold}")
    rows = np.flatnonzero(task_rows(labels, task) & (folds == fold))
    y = task_labels(labels[rows], task)
    return rows, y


def check_split_isolation(manifest: dict[str, Any], store: NoduleStore, fold: int) -> dict[str, Any]:
    """Prove from a run's ``splits.json`` that no nodule or patient of ``fold`` was trained or
    validated on. Raises :class:`SplitLeakError` naming the first offender; returns counts."""
    meta = store.read(("fold", "patient_id"))
    folds = np.asarray(meta["fold"]).astype(np.int64)
    patients = np.asarray(meta["patient_id"]).astype(str)
    n = len(folds)
    rows = {
        k: np.asarray(manifest.get(k, []), dtype=np.int64) for k in ("train_rows", "val_rows", "test_rows")
    }
    for key, values in rows.items():
        if values.size and (values.min() < 0 or values.max() >= n):
            raise SplitLeakError(
                f"{key} of the run's {SPLITS_FILE} point outside store {store.path} (0..{n - 1})"
            )
    fold_patients = set(patients[folds == fold].tolist())
    for key in ("train_rows", "val_rows"):
        in_fold = rows[key][folds[rows[key]] == fold]
        if in_fold.size:
            r = int(in_fold[0])
            raise SplitLeakError(
                f"store row {r} ({patients[r]}) is in fold {fold}, the test fold, but in the run's {key}"
            )
        leaked = sorted(set(patients[rows[key]].tolist()) & fold_patients)
        if leaked:
            raise SplitLeakError(f"test-fold patient {leaked[0]} has nodules in the run's {key}")
    recorded = set(manifest.get("test_patients", []))
    if recorded and recorded - fold_patients:
        other = sorted(recorded - fold_patients)[0]
        raise SplitLeakError(
            f"the run records test patient {other}, who is not in fold {fold} of {store.path}"
        )
    outside = rows["test_rows"][folds[rows["test_rows"]] != fold]
    if outside.size:
        raise SplitLeakError(f"the run's test row {int(outside[0])} is not in fold {fold} of {store.path}")
    return {
        "train_rows": int(rows["train_rows"].size),
        "val_rows": int(rows["val_rows"].size),
        "test_rows": int(rows["test_rows"].size),
        "test_patients": len(fold_patients),
        "leaks": 0,
    }


def split_check(
    choice: CheckpointChoice,
    store: NoduleStore,
    fold: int,
    rows: np.ndarray,
    held_out: bool,
) -> dict[str, Any]:
    """The split check of an evaluation: ``status`` ok (with counts), skipped or not held out (with
    a reason); raises :class:`SplitLeakError` on a leak or a store changed since training."""
    if choice.run is None:
        return {"status": "skipped", "reason": f"no {SPLITS_FILE} next to the checkpoint"}
    manifest = choice.run.read_splits()
    if manifest is None:
        return {"status": "skipped", "reason": f"{choice.run.location} has no {SPLITS_FILE}"}
    recorded_store = manifest.get("store")
    same_store = recorded_store is None or _same_location(str(recorded_store), store.path)
    if not same_store:
        return {"status": "skipped", "reason": f"the run trained on {recorded_store}, not {store.path}"}
    if not held_out:
        return {"status": "not held out", "reason": f"fold {fold} is not the run's test fold"}
    counts = check_split_isolation(manifest, store, fold)
    if sorted(manifest.get("test_rows", [])) != sorted(rows.tolist()):
        raise SplitLeakError(
            f"the run's {SPLITS_FILE} records {len(manifest.get('test_rows', []))} test rows, fold {fold} of "
            f"{store.path} has {len(rows)}: the store changed since training"
        )
    return {"status": "ok", **counts}


def _same_location(a: str, b: str) -> bool:
    try:
        return storage_lib.parse_location(a).url.rstrip("/") == storage_lib.parse_location(b).url.rstrip("/")
    except storage_lib.StorageError:
        return a.rstrip("/") == b.rstrip("/")
