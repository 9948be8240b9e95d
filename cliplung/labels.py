"""The label domain, defined once: class names, the label rules, each task's classes, the settings.

**Label rule.** A nodule's class comes from the mean of its radiologists' (readers') malignancy
ratings ``m`` (1 highly unlikely ... 5 highly suspicious) and an *unsure range* ``[lo, hi]``
(``data.unsure_range``):

* ``m < lo``: **benign** (0); ``lo <= m <= hi``: **unsure** (1); ``m > hi``: **malignant** (2).

Two ranges are named (:data:`UNSURE_RANGES`): ``[3, 3]``, the CLIP-Lung paper's ``< 3 / = 3 / > 3``
(the default, and the rule of every store's ``label`` array, :data:`LABEL_RULE`), and
``[2.5, 3.5]``, the ``< 2.5 / 2.5-3.5 / > 3.5`` rule of the same group's earlier ordinal work
(arXiv 2012.03480). Comparisons are exact for means of integer ratings (means of 1-4 integers
are exact in float32 at every boundary used here). The store keeps ``malignancy`` for every
nodule, so training, validation and evaluation apply the run's rule when they read the store
(:func:`store_labels`); the store's own ``label`` array always follows :data:`LABEL_RULE`.

**Task.** What a model is trained (``data.task``) or tested (``data.test_task``) on: ``3class``
keeps every nodule; ``2class`` drops the unsure nodules and renumbers malignant as 1 (benign 0,
malignant 1). Rows and labels of a task come from :func:`task_rows` and :func:`task_labels`.

**Test on two classes, train on three** (``task: 3class, test_task: 2class``): the unsure test
nodules are dropped and the model's three probabilities become two by conditioning on "not
unsure" (:func:`map_probabilities`)::

    p'(benign) = p(benign) / (p(benign) + p(malignant)),   p'(malignant) = 1 - p'(benign)

Why this map: the test set holds no unsure nodule, so the probability the model gives a
nodule of being malignant *given* it is not unsure is Bayes' rule for exactly that test set; it
keeps the model's benign-vs-malignant ranking (so the AUC is that of ``p(malignant) -
p(benign)`` order), and it does not hand the unsure mass to either side by a convention (adding
``p(unsure)`` to malignant, say, would turn every "unsure" vote into a malignant call). The
predicted class is the larger of the two, i.e. benign vs malignant ignoring the unsure output.
Training 2 classes and testing 3 is refused: a 2-class model has no unsure output.

**Settings** (:data:`SETTINGS`, ``cliplung compare --setting NAME``): a named choice of unsure
range, training task and test task; ``3class`` (the paper's), ``3class-test2``, ``2class``, and
the same three with the 2012.03480 range prefixed ``band-``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BINARY_CLASS_NAMES",
    "CLASS_NAMES",
    "DEFAULT_UNSURE_RANGE",
    "LABEL_RULE",
    "SETTINGS",
    "TASKS",
    "UNSURE_RANGES",
    "DatasetSetting",
    "check_tasks",
    "describe_rule",
    "label_from_malignancy",
    "map_probabilities",
    "setting_name",
    "store_labels",
    "task_class_names",
    "task_labels",
    "task_rows",
]

CLASS_NAMES: tuple[str, ...] = ("benign", "unsure", "malignant")
"""The three classes, by label value."""
BINARY_CLASS_NAMES: tuple[str, ...] = ("benign", "malignant")
"""The classes of the ``2class`` task."""
TASKS: tuple[str, ...] = ("3class", "2class")
UNSURE = 1
MALIGNANT = 2

DEFAULT_UNSURE_RANGE: tuple[float, float] = (3.0, 3.0)
UNSURE_RANGES: dict[str, tuple[float, float]] = {
    "at3": DEFAULT_UNSURE_RANGE,
    "band": (2.5, 3.5),
}
"""Named unsure ranges: ``at3`` (< 3 / = 3 / > 3, the CLIP-Lung paper's, default) and
``band`` (< 2.5 / 2.5-3.5 / > 3.5, arXiv 2012.03480)."""
MALIGNANCY_RANGE = (1.0, 5.0)


def describe_rule(unsure_range: Sequence[float] = DEFAULT_UNSURE_RANGE) -> str:
    """The rule as text, e.g. ``mean reader malignancy < 3: benign (0); == 3: unsure (1); ...``."""
    lo, hi = (float(v) for v in unsure_range)
    f = "{:g}".format
    middle = f"== {f(lo)}" if lo == hi else f"in [{f(lo)}, {f(hi)}]"
    return f"mean reader malignancy < {f(lo)}: benign (0); {middle}: unsure (1); > {f(hi)}: malignant (2)"


LABEL_RULE = describe_rule(DEFAULT_UNSURE_RANGE)
"""The rule of every store's ``label`` array (the default unsure range)."""


def label_from_malignancy(
    mean_malignancy: np.ndarray | float, unsure_range: Sequence[float] = DEFAULT_UNSURE_RANGE
) -> np.ndarray:
    """The label rule (module docstring) applied to reader-mean malignancy: int8 labels 0/1/2."""
    lo, hi = (float(v) for v in unsure_range)
    m = np.asarray(mean_malignancy, dtype=np.float64)
    return np.where(m < lo, 0, np.where(m > hi, MALIGNANT, UNSURE)).astype(np.int8)


def store_labels(meta: dict[str, np.ndarray], unsure_range: Sequence[float] = DEFAULT_UNSURE_RANGE):
    """Three-class labels (int64) of store rows read with ``malignancy``, under ``unsure_range``."""
    return label_from_malignancy(np.asarray(meta["malignancy"]), unsure_range).astype(np.int64)


def task_class_names(task: str) -> tuple[str, ...]:
    """The class names of ``task``, in model-output order."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    return CLASS_NAMES if task == "3class" else BINARY_CLASS_NAMES


def check_tasks(task: str, test_task: str) -> str | None:
    """Why training on ``task`` and testing on ``test_task`` cannot work, or None."""
    if task == "2class" and test_task == "3class":
        return "a 2class model has no unsure output: it cannot be tested on 3class"
    return None


def task_rows(labels: np.ndarray, task: str) -> np.ndarray:
    """Boolean mask of the rows ``task`` uses (``2class`` drops unsure nodules)."""
    labels = np.asarray(labels)
    return labels != UNSURE if task == "2class" else np.ones(len(labels), dtype=bool)


def task_labels(labels: np.ndarray, task: str) -> np.ndarray:
    """Three-class labels as ``task``'s class indices (int64); for ``2class`` apply to kept rows only."""
    labels = np.asarray(labels, dtype=np.int64)
    return (labels == MALIGNANT).astype(np.int64) if task == "2class" else labels


def map_probabilities(probs: np.ndarray, task: str, test_task: str) -> np.ndarray:
    """A ``task`` model's probabilities ``(N, C)`` as ``test_task``'s (module docstring): as they
    are when the tasks agree; 3 -> 2 classes by conditioning on "not unsure"."""
    probs = np.asarray(probs, dtype=np.float64)
    problem = check_tasks(task, test_task)
    if problem:
        raise ValueError(problem)
    if task == test_task:
        return probs
    benign, malignant = probs[:, 0], probs[:, MALIGNANT]
    total = benign + malignant
    # A softmax in float64 is never exactly 0 for both, short of underflow: then say "no idea".
    p_benign = np.divide(benign, total, out=np.full(len(probs), 0.5), where=total > 0)
    return np.stack([p_benign, 1.0 - p_benign], axis=1)


@dataclass(frozen=True)
class DatasetSetting:
    """A named dataset setting: the unsure range, the training task and the test task."""

    name: str
    unsure_range: tuple[float, float]
    task: str
    test_task: str
    description: str

    def overrides(self) -> list[str]:
        """``--set`` items that select this setting."""
        lo, hi = self.unsure_range
        return [
            f"data.unsure_range=[{lo}, {hi}]",
            f"data.task={self.task}",
            f"data.test_task={self.test_task}",
        ]


def _settings() -> dict[str, DatasetSetting]:
    out = {}
    for prefix, range_name in (("", "at3"), ("band-", "band")):
        rng = UNSURE_RANGES[range_name]
        rule = f"labels {describe_rule(rng).removeprefix('mean reader malignancy ')}"
        for suffix, task, test_task, what in (
            ("3class", "3class", "3class", "benign / unsure / malignant in training and test"),
            (
                "3class-test2",
                "3class",
                "2class",
                "3 classes in training; benign vs malignant in test (unsure test nodules dropped, "
                "probabilities conditioned on not unsure)",
            ),
            ("2class", "2class", "2class", "benign vs malignant in training and test (unsure dropped)"),
        ):
            name = f"{prefix}{suffix}"
            out[name] = DatasetSetting(name, rng, task, test_task, f"{what}; {rule} ({range_name} range)")
    return out


SETTINGS: dict[str, DatasetSetting] = _settings()
"""``3class`` (the CLIP-Lung paper's setting), ``3class-test2``, ``2class``, and ``band-3class``,
``band-3class-test2``, ``band-2class`` with the 2.5-3.5 unsure range of arXiv 2012.03480."""


def setting_name(unsure_range: Sequence[float], task: str, test_task: str) -> str | None:
    """The name of the setting these fields make, or None for a combination without one."""
    key = (tuple(float(v) for v in unsure_range), task, test_task)
    return next((s.name for s in SETTINGS.values() if (s.unsure_range, s.task, s.test_task) == key), None)
