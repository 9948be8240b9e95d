"""Paired statistics of ``compare``: vectorised metrics against scikit-learn, the exact Wilcoxon
test against scipy, and the paired bootstrap on cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cliplung.evaluate.metrics import compute_metrics
from cliplung.evaluate.stats import FoldPredictions, paired_comparison, wilcoxon_signed_rank_exact
from cliplung.train.metrics import classification_metrics, weighted_auc, weighted_f1

CLASSES = ("benign", "unsure", "malignant")


def _fold(rng, n=40, n_classes=3, skill=1.0, labels=None, patients=None):
    labels = rng.integers(0, n_classes, n) if labels is None else labels
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), labels] += skill
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    patients = np.repeat(np.arange(n // 2), 2) if patients is None else patients
    return FoldPredictions(rows=np.arange(n), labels=labels, patients=patients.astype(str), probs=probs)


def _sklearn_metrics(labels, probs, names):
    """The reference: what scikit-learn says for the headline and per-class metrics."""
    import warnings

    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    classes = list(range(len(names)))
    preds = probs.argmax(1)
    present = set(np.unique(labels).tolist())
    out = {
        "accuracy": accuracy_score(labels, preds),
        "macro_f1": f1_score(labels, preds, labels=classes, average="macro", zero_division=0),
        "auc": math.nan,
    }
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=classes, zero_division=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(present) == len(names):
            out["auc"] = (
                roc_auc_score(labels, probs[:, 1])
                if len(names) == 2
                else roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=classes)
            )
        per_class = {
            name: {
                "precision": precision[c], "recall": recall[c], "f1": f1[c], "support": int(support[c]),
                "auc": roc_auc_score(labels == c, probs[:, c]) if 0 < support[c] < len(labels) else math.nan,
            }
            for c, name in enumerate(names)
        }  # fmt: skip
    return out, per_class, confusion_matrix(labels, preds, labels=classes).tolist()


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("case", range(40))
def test_metrics_equal_sklearn(n_classes, case):
    """classification_metrics (validation and the test report) and compute_metrics's per-class
    numbers are NumPy; scikit-learn is the reference: small and large sets, rounded scores (ties),
    a class absent, one class only."""
    rng = np.random.default_rng(case)
    names = CLASSES if n_classes == 3 else ("benign", "malignant")
    n = int(rng.choice([1, 2, 3, 7, 20, 137]))
    labels = rng.integers(0, n_classes, n) if case % 5 else rng.integers(0, n_classes - 1, n)
    if case % 11 == 0:
        labels[:] = labels[0]
    logits = rng.normal(size=(n, n_classes)) + rng.uniform(0, 2) * np.eye(n_classes)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if case % 3 == 0:
        probs = np.round(probs, 1)  # many tied scores (rows still sum to about 1)
        probs /= probs.sum(axis=1, keepdims=True)
    ref, ref_per_class, ref_confusion = _sklearn_metrics(labels, probs, names)
    got = classification_metrics(labels, probs, names)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, nan_ok=True, abs=1e-12), key
    for c, name in enumerate(names):
        expected = _sklearn_metrics(labels, probs, names)[1][name]["recall"] if c in set(labels) else math.nan
        assert got[f"recall_{name}"] == pytest.approx(expected, nan_ok=True), name
    full = compute_metrics(labels, probs, names)
    assert full["confusion_matrix"] == ref_confusion
    for name, expected in ref_per_class.items():
        for key, value in expected.items():
            assert full["per_class"][name][key] == pytest.approx(value, nan_ok=True, abs=1e-12), (name, key)


def test_metrics_refuse_probabilities_that_are_not_finite():
    with pytest.raises(ValueError, match="NaN or infinity"):
        classification_metrics(
            np.array([0, 1]), np.array([[0.5, 0.5], [np.nan, 0.5]]), ("benign", "malignant")
        )


@pytest.mark.parametrize("n_classes", [2, 3])
def test_weighted_metrics_equal_sklearn_on_the_replicated_sample(n_classes):
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    fold = _fold(rng, n=50, n_classes=n_classes, skill=0.8)
    fold.probs[3] = fold.probs[4]  # a tie between two nodules' scores
    names = CLASSES if n_classes == 3 else ("benign", "malignant")
    ones = np.ones((1, 50))
    ref = _sklearn_metrics(fold.labels, fold.probs, names)[0]
    preds = fold.probs.argmax(1)
    assert weighted_f1(fold.labels, preds, ones, n_classes).mean() == pytest.approx(ref["macro_f1"])
    assert weighted_auc(fold.labels, fold.probs, ones)[0] == pytest.approx(ref["auc"])
    # Integer weights are a resample: the same numbers as scikit-learn on the repeated rows.
    weights = rng.integers(0, 3, size=(4, 50))
    for w in weights:
        idx = np.repeat(np.arange(50), w)
        rep = _sklearn_metrics(fold.labels[idx], fold.probs[idx], names)[0]
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
