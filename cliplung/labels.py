"""The label domain, defined once: class names, the label rule, and each task's classes.

Every nodule store keeps the three-class label of the CLIP-Lung paper, computed from the mean of
the radiologists' (readers') malignancy ratings (1 highly unlikely ... 5 highly suspicious):

* ``< 3``: **benign** (0); ``== 3``: **unsure** (1); ``> 3``: **malignant** (2).

A *task* is what a model is trained and scored on: ``3class`` uses the store's labels as they are;
``2class`` drops the unsure nodules and renumbers malignant as 1 (benign 0, malignant 1).
Training splits, validation, evaluation and prediction all go through :func:`task_rows` and
:func:`task_labels`, so the remap exists in one place.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BINARY_CLASS_NAMES",
    "CLASS_NAMES",
    "LABEL_RULE",
    "TASKS",
    "label_from_malignancy",
    "task_class_names",
    "task_labels",
    "task_rows",
]

CLASS_NAMES: tuple[str, ...] = ("benign", "unsure", "malignant")
"""The store's classes, by label value."""
BINARY_CLASS_NAMES: tuple[str, ...] = ("benign", "malignant")
"""The classes of the ``2class`` task."""
TASKS: tuple[str, ...] = ("3class", "2class")
LABEL_RULE = "mean reader malignancy < 3: benign (0); == 3: unsure (1); > 3: malignant (2)"
UNSURE = 1
MALIGNANT = 2


def label_from_malignancy(mean_malignancy: np.ndarray | float) -> np.ndarray:
    """``LABEL_RULE`` applied to reader-mean malignancy (exact for means of integer ratings)."""
    m = np.asarray(mean_malignancy, dtype=np.float64)
    return np.where(m < 3.0, 0, np.where(m == 3.0, UNSURE, MALIGNANT)).astype(np.int8)


def task_class_names(task: str) -> tuple[str, ...]:
    """The class names of ``task``, in model-output order."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    return CLASS_NAMES if task == "3class" else BINARY_CLASS_NAMES


def task_rows(labels: np.ndarray, task: str) -> np.ndarray:
    """Boolean mask of the store rows ``task`` uses (``2class`` drops unsure nodules)."""
    labels = np.asarray(labels)
    return labels != UNSURE if task == "2class" else np.ones(len(labels), dtype=bool)


def task_labels(labels: np.ndarray, task: str) -> np.ndarray:
    """Store labels as ``task``'s class indices (int64); for ``2class`` apply to kept rows only."""
    labels = np.asarray(labels, dtype=np.int64)
    return (labels == MALIGNANT).astype(np.int64) if task == "2class" else labels
