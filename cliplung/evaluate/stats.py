"""Paired comparison of two methods over the same cross-validation folds.

Every method of ``cliplung compare`` is trained and tested on the same folds, so its per-fold test
metrics pair with the baseline's (``ce``): for fold ``k``, ``d_k = metric(method, k) - metric(ce, k)``.
The table reports the mean of ``d_k`` over folds, every ``d_k``, and two things about its
uncertainty:

**A paired bootstrap confidence interval (the primary number).** With five folds a test over the
five ``d_k`` alone says little: the exact two-sided Wilcoxon signed-rank p-value cannot go below
``2 / 2^5 = 0.0625`` however large the effect, and a bootstrap over five values has only 126
distinct resamples and an interval that is too narrow. The CI here resamples the *test patients*
instead: within each fold, patients are drawn with replacement (a patient's nodules stay together,
since they are not independent), both methods are scored on the same resampled nodules (the
pairing), the per-fold differences are averaged over folds, and the 2.5 and 97.5 percentiles of
:data:`BOOTSTRAP_SAMPLES` such means (seeded) are the 95 % interval. It answers "how much would the
mean difference move with another sample of test patients, these trained models given"; the
fold-to-fold spread of ``d_k`` (retraining on other patients) is shown next to it, and the
interval says nothing about a different random seed.

**The exact Wilcoxon signed-rank p-value** over the ``d_k`` (all ``2^n`` sign assignments of the
ranks, ties averaged, zero differences dropped as Wilcoxon did), reported for completeness with
its floor, so that nobody reads "p = 0.06" at five folds as weak evidence of no effect.

The metrics are the vectorised ones of :mod:`cliplung.train.metrics`, with each resample given as
integer weights per nodule (how often it was drawn); with all weights 1 they are
:func:`~cliplung.train.metrics.classification_metrics` (which equals scikit-learn's): macro-F1 over
every class with 0 for an undefined ratio, per-class F1, and the one-vs-rest macro AUC (NaN when a
class is absent).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cliplung.train.metrics import weighted_auc, weighted_f1

__all__ = [
    "BOOTSTRAP_SAMPLES",
    "FoldPredictions",
    "PairedResult",
    "paired_comparison",
    "wilcoxon_signed_rank_exact",
]

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class FoldPredictions:
    """One method's test predictions on one fold: store rows, true classes, patient ids, probabilities."""

    rows: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    probs: np.ndarray


@dataclass(frozen=True)
class PairedResult:
    """The paired difference ``method - baseline`` of one metric over folds."""

    metric: str
    folds: tuple[int, ...]
    differences: tuple[float, ...]
    """Per-fold differences ``d_k`` (NaN where the metric is undefined on the fold)."""
    mean: float
    ci_low: float
    ci_high: float
    wilcoxon_p: float
    wins: int
    """Folds where the method beats the baseline (``d_k > 0``)."""


# --------------------------------------------------------------------------- resampled metrics


def _metric(name: str, fold: FoldPredictions, weights: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    n_classes = len(class_names)
    if name == "auc":
        return weighted_auc(fold.labels, fold.probs, weights)
    f1 = weighted_f1(fold.labels, fold.probs.argmax(axis=1), weights, n_classes)
    if name == "macro_f1":
        return f1.mean(axis=1)
    if name.startswith("f1_") and name[3:] in class_names:
        return f1[:, list(class_names).index(name[3:])]
    raise ValueError(f"no paired statistic for metric {name!r}")


# --------------------------------------------------------------------------- tests


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def wilcoxon_signed_rank_exact(differences: Sequence[float]) -> float:
    """Exact two-sided p-value of the Wilcoxon signed-rank test (module docstring); NaN values and
    zero differences are dropped, 1.0 when nothing is left."""
    d = np.asarray([x for x in differences if math.isfinite(x) and x != 0], dtype=np.float64)
    n = len(d)
    if n == 0:
        return 1.0
    if n > 20:
        raise ValueError("the exact test enumerates 2^n sign patterns; use at most 20 folds")
    ranks = _average_ranks(np.abs(d))
    observed = ranks[d > 0].sum()
    expected = ranks.sum() / 2
    extreme = abs(observed - expected) - 1e-9
    count = 0
    for signs in itertools.product((0, 1), repeat=n):
        statistic = float(np.dot(signs, ranks))
        count += abs(statistic - expected) >= extreme
    return count / 2**n


def _percentile_ci(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return math.nan, math.nan
    tail = (1 - CONFIDENCE) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_comparison(
    method: dict[int, FoldPredictions],
    baseline: dict[int, FoldPredictions],
    metrics: Sequence[str],
    class_names: Sequence[str],
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> list[PairedResult]:
    """``method - baseline`` for each of ``metrics`` over the folds both have (module docstring).

    Both must hold the same test rows per fold (same store, fold and test task), else ValueError.
    """
    folds = sorted(set(method) & set(baseline))
    if not folds:
        raise ValueError("no fold in common between the method and the baseline")
    rng = np.random.default_rng(seed)
    weights: dict[int, np.ndarray] = {}
    for k in folds:
        a, b = method[k], baseline[k]
        if not np.array_equal(a.rows, b.rows):
            raise ValueError(f"fold {k}: the method and the baseline were tested on different rows")
        patients, index = np.unique(a.patients, return_inverse=True)
        counts = rng.multinomial(len(patients), np.full(len(patients), 1 / len(patients)), size=samples)
        weights[k] = counts[:, index]
    results = []
    for name in metrics:
        observed, boot = [], []
        for k in folds:
            ones = np.ones((1, len(method[k].rows)))
            observed.append(
                float(
                    _metric(name, method[k], ones, class_names)[0]
                    - _metric(name, baseline[k], ones, class_names)[0]
                )
            )
            boot.append(
                _metric(name, method[k], weights[k], class_names)
                - _metric(name, baseline[k], weights[k], class_names)
            )
        d = np.array(observed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample where every fold is NaN
            means = np.nanmean(np.stack(boot), axis=0)
        lo, hi = _percentile_ci(means)
        finite = d[np.isfinite(d)]
        results.append(
            PairedResult(
                metric=name,
                folds=tuple(folds),
                differences=tuple(float(x) for x in d),
                mean=float(finite.mean()) if finite.size else math.nan,
                ci_low=lo,
                ci_high=hi,
                wilcoxon_p=wilcoxon_signed_rank_exact(d.tolist()),
                wins=int((finite > 0).sum()),
            )
        )
    return results
