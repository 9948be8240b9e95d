"""Classification metrics of a malignancy classifier, computed with scikit-learn.

``probs`` are softmax probabilities (N, C) and ``labels`` the true classes (N,). Metrics that are
undefined for the data at hand (AUC when a class is absent, recall of an absent class) come back
as NaN rather than a misleading number.

:func:`reported_metrics` names every metric the training loop reports each epoch (and Tune sees),
so ``train.checkpoint_metric`` and ``tune.metric`` are checked against it when the config is built,
before any worker starts. Keep it in step with :func:`classification_metrics` and the loop's
report (``cliplung/train/loop.py``); a test compares them.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = [
    "LOSS_PARTS",
    "TRAIN_STATS",
    "classification_metric_names",
    "classification_metrics",
    "reported_metrics",
]

LOSS_PARTS = {"ce": ("loss", "ce"), "contrastive": ("loss", "ce", "ic", "ca", "ia")}
"""Loss parts the loop reports as ``train/<part>``: the ``ce`` baseline has cross-entropy only,
every prompt method adds the image-class, class-attribute and image-attribute contrastive losses."""
TRAIN_STATS = ("lr", "samples_per_second", "data_wait_share", "epoch_seconds", "peak_memory_mb")
"""Per-epoch statistics the loop reports as ``train/<name>``."""


def classification_metric_names(class_names: tuple[str, ...]) -> tuple[str, ...]:
    """The keys :func:`classification_metrics` returns (without prefix), in its order."""
    return ("accuracy", "macro_f1", *(f"recall_{name}" for name in class_names), "auc")


def reported_metrics(class_names: tuple[str, ...], method: str) -> tuple[str, ...]:
    """Every metric name the training loop reports per epoch for a task and ``model.method``:
    ``val/`` classification metrics, ``train/`` losses and statistics, ``epoch``, ``epochs_done``
    (``epoch + 1``: Tune's time axis) and ``global_step``."""
    parts = LOSS_PARTS["ce" if method == "ce" else "contrastive"]
    return (
        "epoch",
        "epochs_done",
        "global_step",
        *(f"train/{p}" for p in parts),
        *(f"train/{s}" for s in TRAIN_STATS),
        *(f"val/{m}" for m in classification_metric_names(class_names)),
    )


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, class_names: tuple[str, ...], prefix: str = ""
) -> dict[str, float]:
    """Accuracy, macro-F1, per-class recall and one-vs-rest macro AUC, keys prefixed by ``prefix``."""
    # Imported here so the config can name the metrics without loading scikit-learn.
    from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != n_classes or len(labels) != len(probs):
        raise ValueError(
            f"expected probs (N, {n_classes}) and labels (N,), got {probs.shape} and {labels.shape}"
        )
    if len(labels) == 0:
        return {f"{prefix}{k}": math.nan for k in ("accuracy", "macro_f1", "auc")}
    preds = probs.argmax(axis=1)
    all_classes = list(range(n_classes))
    present = np.unique(labels)
    out = {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=all_classes, average="macro", zero_division=0)),
    }
    recalls = recall_score(labels, preds, labels=all_classes, average=None, zero_division=0)
    for c, name in enumerate(class_names):
        out[f"recall_{name}"] = float(recalls[c]) if c in present else math.nan
    if len(present) == n_classes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if n_classes == 2:
                out["auc"] = float(roc_auc_score(labels, probs[:, 1]))
            else:
                out["auc"] = float(
                    roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=all_classes)
                )
    else:
        out["auc"] = math.nan
    return {f"{prefix}{k}": v for k, v in out.items()}
