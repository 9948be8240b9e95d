"""Paired statistics of ``compare``: vectorised metrics against scikit-learn, the exact Wilcoxon
test against scipy, and the paired bootstrap on cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cliplung.evaluate.stats import (
    FoldPredictions,
    paired_comparison,
    weighted_auc,
    weighted_f1,
    wilcoxon_signed_rank_exact,
)
from cliplung.train.metrics import classification_metrics

CLASSES = ("benign", "unsure", "malignant")


def _fold(rng, n=40, n_classes=3, skill=1.0, labels=None, patients=None):
    labels = rng.integers(0, n_classes, n) if labels is None else labels
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), labels] += skill
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    patients = np.repeat(np.arange(n // 2), 2) if patients is None else patients
    return FoldPredictions(rows=np.arange(n), labels=labels, patients=patients.astype(str), probs=probs)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_weighted_metrics_equal_sklearn_on_the_replicated_sample(n_classes):
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    fold = _fold(rng, n=50, n_classes=n_classes, skill=0.8)
    fold.probs[3] = fold.probs[4]  # a tie between two nodules' scores
    names = CLASSES if n_classes == 3 else ("benign", "malignant")
    ones = np.ones((1, 50))
    ref = classification_metrics(fold.labels, fold.probs, names)
    preds = fold.probs.argmax(1)
    assert weighted_f1(fold.labels, preds, ones, n_classes).mean() == pytest.approx(ref["macro_f1"])
    assert weighted_auc(fold.labels, fold.probs, ones)[0] == pytest.approx(ref["auc"])
    # Integer weights are a resample: the same numbers as scikit-learn on the repeated rows.
    weights = rng.integers(0, 3, size=(4, 50))
    for w in weights:
        idx = np.repeat(np.arange(50), w)
        rep = classification_metrics(fold.labels[idx], fold.probs[idx], names)
        got_f1 = weighted_f1(fold.labels, preds, w[None], n_classes)[0]
        np.testing.assert_allclose(
            got_f1,
            f1_score(
                fold.labels[idx], preds[idx], labels=list(range(n_classes)), average=None, zero_division=0
            ),
        )
        assert weighted_auc(fold.labels, fold.probs, w[None])[0] == pytest.approx(rep["auc"], nan_ok=True)


def test_auc_is_nan_when_a_resample_lacks_a_class():
    labels = np.array([0, 0, 1, 2])
    probs = np.eye(3)[labels] * 0.5 + 0.5 / 3
    w = np.array([[1, 1, 0, 1], [1, 1, 1, 1]])
    auc = weighted_auc(labels, probs, w)
    assert math.isnan(auc[0]) and auc[1] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "d",
    [[0.1, 0.2, -0.05, 0.3, 0.15], [0.1, 0.1, -0.1, 0.2, 0.3], [1, 2, 3, 4, 5, 6, -7], [0.5, -0.2, 0.0, 0.3]],
)
def test_exact_wilcoxon_matches_scipy(d):
    from scipy.stats import wilcoxon

    expected = wilcoxon([x for x in d if x != 0], method="exact").pvalue
    if len(set(np.abs(d))) < len(d):  # ties: scipy's exact test ignores them; compare with permutation
        expected = _signed_rank_permutation_p(np.array([x for x in d if x != 0]))
    assert wilcoxon_signed_rank_exact(d) == pytest.approx(expected)


def _signed_rank_permutation_p(d):
    from itertools import product

    from scipy.stats import rankdata

    ranks = rankdata(np.abs(d))
    obs = ranks[d > 0].sum() - ranks.sum() / 2
    stats = [np.dot(s, ranks) - ranks.sum() / 2 for s in product((0, 1), repeat=len(d))]
    return np.mean(np.abs(stats) >= abs(obs) - 1e-9)


def test_wilcoxon_floor_at_five_folds_and_degenerate_cases():
    assert wilcoxon_signed_rank_exact([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 32)
    assert wilcoxon_signed_rank_exact([0.0, 0.0]) == 1.0
    assert wilcoxon_signed_rank_exact([float("nan"), 0.2]) == 1.0  # one difference: p = 2/2


def test_paired_bootstrap_of_a_method_against_itself_is_zero():
    rng = np.random.default_rng(1)
    folds = {k: _fold(rng) for k in range(3)}
    [res] = paired_comparison(folds, folds, ["macro_f1"], CLASSES, samples=200)
    assert res.differences == (0.0, 0.0, 0.0) and res.mean == 0.0
    assert (res.ci_low, res.ci_high) == (0.0, 0.0) and res.wins == 0 and res.wilcoxon_p == 1.0


def test_paired_bootstrap_sees_a_clearly_better_method():
    rng = np.random.default_rng(2)
    base, better = {}, {}
    for k in range(5):
        b = _fold(rng, n=80, skill=0.2)
        base[k] = b
        strong = _fold(rng, n=80, skill=3.0, labels=b.labels, patients=b.patients.astype(int))
        better[k] = strong
    results = {
        r.metric: r for r in paired_comparison(better, base, ["macro_f1", "auc", "f1_unsure"], CLASSES)
    }
    for r in results.values():
        assert r.mean > 0.2 and 0 < r.ci_low < r.mean < r.ci_high and r.wins == 5
        assert r.wilcoxon_p == pytest.approx(2 / 32)
    # The observed per-fold differences are exactly scikit-learn's.
    for k in range(5):
        ref = classification_metrics(better[k].labels, better[k].probs, CLASSES)["macro_f1"]
        ref -= classification_metrics(base[k].labels, base[k].probs, CLASSES)["macro_f1"]
        assert results["macro_f1"].differences[k] == pytest.approx(ref)


def test_paired_bootstrap_resamples_patients_and_refuses_unpaired_rows():
    rng = np.random.default_rng(3)
    # Every patient holds 10 nodules: resampling patients moves the estimate far more than the
    # same data resampled as 40 independent nodules would, so the interval is wider.
    a = _fold(rng, n=40, skill=1.0, patients=np.repeat(np.arange(4), 10))
    b = FoldPredictions(a.rows, a.labels, a.patients, np.roll(a.probs, 1, axis=1))
    few = paired_comparison({0: a}, {0: b}, ["macro_f1"], CLASSES, samples=500)[0]
    a2 = FoldPredictions(a.rows, a.labels, np.arange(40).astype(str), a.probs)
    b2 = FoldPredictions(a.rows, a.labels, a2.patients, b.probs)
    many = paired_comparison({0: a2}, {0: b2}, ["macro_f1"], CLASSES, samples=500)[0]
    assert few.mean == pytest.approx(many.mean)
    assert few.ci_high - few.ci_low > many.ci_high - many.ci_low
    shifted = FoldPredictions(a.rows + 1, a.labels, a.patients, a.probs)
    with pytest.raises(ValueError, match="different rows"):
        paired_comparison({0: shifted}, {0: b}, ["auc"], CLASSES)
    with pytest.raises(ValueError, match="no paired statistic"):
        paired_comparison({0: a}, {0: b}, ["ece"], CLASSES)
