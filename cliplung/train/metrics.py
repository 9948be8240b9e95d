"""Classification metrics of a malignancy classifier, computed with scikit-learn.

``probs`` are softmax probabilities (N, C) and ``labels`` the true classes (N,). Metrics that are
undefined for the data at hand (AUC when a class is absent, recall of an absent class) come back
as NaN rather than a misleading number.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

__all__ = ["classification_metrics"]


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, class_names: tuple[str, ...], prefix: str = ""
) -> dict[str, float]:
    """Accuracy, macro-F1, per-class recall and one-vs-rest macro AUC, keys prefixed by ``prefix``."""
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
