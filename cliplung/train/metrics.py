"""Classification metrics of a malignancy classifier, in NumPy: the one definition of each.

``probs`` are softmax probabilities (N, C) and ``labels`` the true classes (N,). Metrics that are
undefined for the data at hand (AUC when a class is absent, recall of an absent class) come back
as NaN rather than a misleading number.

:func:`weighted_f1`, :func:`weighted_recall`, :func:`weighted_auc` and :func:`weighted_binary_auc` score many resamples at once
(``weights (B, N)``: how often each row was drawn; ``compare``'s paired bootstrap,
``cliplung/evaluate/stats.py``); :func:`classification_metrics` is the same functions with every
weight 1, which is what validation during training and the test-fold report call. They equal
scikit-learn's ``f1_score`` / ``recall_score`` (``zero_division=0``) and ``roc_auc_score`` (binary,
or one-vs-rest macro) on the same rows (``tests/test_stats.py`` checks it). Written here rather
than called from scikit-learn so a training worker does not import scikit-learn and SciPy (about
0.9 s of every worker's start, measured with ``python -X importtime``).

:func:`reported_metrics` names every metric the training loop reports each epoch (and Tune sees),
so ``train.checkpoint_metric`` and ``tune.metric`` are checked against it when the config is built,
before any worker starts. Keep it in step with :func:`classification_metrics` and the loop's
report (``cliplung/train/loop.py``); a test compares them.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "LOSS_PARTS",
    "TRAIN_STATS",
    "classification_metric_names",
    "classification_metrics",
    "reported_metrics",
    "weighted_auc",
    "weighted_binary_auc",
    "weighted_f1",
    "weighted_recall",
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


def _resamples(weights: np.ndarray) -> np.ndarray:
    return np.atleast_2d(np.asarray(weights, dtype=np.float64))


def _per_class_counts(
    labels: np.ndarray, preds: np.ndarray, weights: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, false positives and false negatives per resample and class, each ``(B, C)``."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    w = _resamples(weights)
    truth = np.stack([labels == c for c in range(n_classes)], axis=1)  # (N, C)
    called = np.stack([preds == c for c in range(n_classes)], axis=1)
    return w @ (truth & called), w @ (~truth & called), w @ (truth & ~called)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, 0 where the denominator is 0 (scikit-learn's ``zero_division=0``)."""
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def weighted_f1(labels: np.ndarray, preds: np.ndarray, weights: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class F1 of every resample: ``weights (B, N)`` counts -> ``(B, C)``; 0 where undefined."""
    tp, fp, fn = _per_class_counts(labels, preds, weights, n_classes)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def weighted_recall(labels: np.ndarray, preds: np.ndarray, weights: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class recall of every resample: ``weights (B, N)`` -> ``(B, C)``; 0 where undefined."""
    tp, _, fn = _per_class_counts(labels, preds, weights, n_classes)
    return _ratio(tp, tp + fn)


def weighted_binary_auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of ``scores`` for the rows where ``positive`` is true, for every resample
    (``weights (B, N)`` -> ``(B,)``); NaN where a resample has no positive or no negative row.

    Mann-Whitney: a (positive, negative) pair counts 1 when the positive scores higher, 1/2 when
    tied. The scores are sorted once and tied scores grouped, so each resample costs O(N) after
    the sort.
    """
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    w = _resamples(weights)
    if positive.size == 0:
        return np.full(w.shape[0], np.nan)
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    groups = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first row of each tie
    pos = positive[order]
    ws = w[:, order]
    wp = np.add.reduceat(ws * pos, groups, axis=1)  # (B, groups)
    wn = np.add.reduceat(ws * ~pos, groups, axis=1)
    below = np.cumsum(wn, axis=1) - wn  # negative weight scoring lower than each group
    numerator = (wp * (below + 0.5 * wn)).sum(axis=1)
    denom = wp.sum(axis=1) * wn.sum(axis=1)
    return np.divide(numerator, denom, out=np.full(w.shape[0], np.nan), where=denom > 0)


def weighted_auc(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest macro AUC of every resample (2 classes: the second class's score, the malignant
    one); NaN where a class is absent from the resample. ``weights (B, N)`` -> ``(B,)``."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    w = _resamples(weights)
    n_classes = probs.shape[1]
    present = np.ones(w.shape[0], dtype=bool)
    for c in range(n_classes):
        present &= w @ (labels == c) > 0
    classes = [1] if n_classes == 2 else range(n_classes)
    aucs = [weighted_binary_auc(labels == c, probs[:, c], w) for c in classes]
    return np.where(present, np.mean(aucs, axis=0), np.nan)


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, class_names: tuple[str, ...], prefix: str = ""
) -> dict[str, float]:
    """Accuracy, macro-F1, per-class recall and one-vs-rest macro AUC, keys prefixed by ``prefix``.

    Probabilities that are not finite are refused (``ValueError``), as scikit-learn refuses them."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != n_classes or len(labels) != len(probs):
        raise ValueError(
            f"expected probs (N, {n_classes}) and labels (N,), got {probs.shape} and {labels.shape}"
        )
    if len(labels) == 0:
        return {f"{prefix}{k}": math.nan for k in ("accuracy", "macro_f1", "auc")}
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or infinity")
    preds = probs.argmax(axis=1)
    ones = np.ones((1, len(labels)))
    present = set(np.unique(labels).tolist())
    out = {
        "accuracy": float(np.mean(preds == labels)),
        "macro_f1": float(weighted_f1(labels, preds, ones, n_classes).mean()),
    }
    recalls = weighted_recall(labels, preds, ones, n_classes)[0]
    for c, name in enumerate(class_names):
        out[f"recall_{name}"] = float(recalls[c]) if c in present else math.nan
    out["auc"] = float(weighted_auc(labels, probs, ones)[0])
    return {f"{prefix}{k}": v for k, v in out.items()}
