"""Test-fold metrics of a malignancy classifier, plus calibration.

The headline numbers (accuracy, macro-F1, one-vs-rest AUC) come from
:func:`cliplung.train.metrics.classification_metrics`, the same function that scores validation
during training, so a checkpoint is selected and reported by one definition. Added here for the
test report, from the same module's functions: per-class precision, recall, F1 (0 where a ratio is
undefined, scikit-learn's ``zero_division=0``), support and one-vs-rest AUC (NaN when the class is
absent, or the only one);
the confusion matrix (rows true class, columns predicted); and the expected calibration error

    ECE = Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|

over ``n_bins`` (10) equal-width bins of the top-class probability (*confidence*), bin ``b``
covering ``(b/n, (b+1)/n]`` (bin 0 also holds 0); ``acc`` is the share of correct top-class
predictions in the bin and ``conf`` its mean confidence (Guo et al., 2017). Equal-width bins make
the reliability diagram read directly; with test folds of tens of nodules many bins stay empty and
ECE is a coarse number: it is reported with its per-bin counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cliplung.train.metrics import classification_metrics, weighted_binary_auc, weighted_f1, weighted_recall

__all__ = ["ECE_BINS", "compute_metrics", "expected_calibration_error"]

ECE_BINS = 10


def expected_calibration_error(
    labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[float, list[dict[str, float]]]:
    """ECE over ``n_bins`` equal-width confidence bins (module docstring) and the per-bin table
    ``{"lo", "hi", "count", "accuracy", "confidence"}`` (NaN accuracy/confidence for empty bins)."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64) if len(probs) else np.zeros(0)
    # searchsorted(left) - 1 puts x in bin b with edges[b] < x <= edges[b + 1]; 0 goes to bin 0.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    n = len(labels)
    ece, bins = 0.0, []
    for b in range(n_bins):
        mask = index == b
        count = int(mask.sum())
        acc = float(correct[mask].mean()) if count else math.nan
        conf = float(confidence[mask].mean()) if count else math.nan
        if count:
            ece += count / n * abs(acc - conf)
        bins.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "count": count,
                "accuracy": acc,
                "confidence": conf,
            }
        )
    return (float(ece) if n else math.nan), bins


def compute_metrics(
    labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], *, n_bins: int = ECE_BINS
) -> dict[str, Any]:
    """Every metric of the module docstring for true ``labels`` (N,) and probabilities ``(N, C)``."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(labels) == 0:
        raise ValueError("no nodules to evaluate")
    headline = classification_metrics(labels, probs, tuple(class_names))
    n_classes = len(class_names)
    preds = probs.argmax(axis=1)
    ones = np.ones((1, len(labels)))
    recall = weighted_recall(labels, preds, ones, n_classes)[0]
    f1 = weighted_f1(labels, preds, ones, n_classes)[0]
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    per_class: dict[str, dict[str, float]] = {}
    for c, name in enumerate(class_names):
        positives = int(confusion[c].sum())
        predicted = int(confusion[:, c].sum())
        per_class[name] = {
            "precision": float(confusion[c, c] / predicted) if predicted else 0.0,
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "support": positives,
            "auc": float(weighted_binary_auc(labels == c, probs[:, c], ones)[0]),
        }
    ece, bins = expected_calibration_error(labels, probs, n_bins)
    return {
        "n": len(labels),
        "accuracy": headline["accuracy"],
        "macro_f1": headline["macro_f1"],
        "auc": headline["auc"],
        "ece": ece,
        "ece_bins": n_bins,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "reliability": bins,
    }
