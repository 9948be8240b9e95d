"""Early stopping: "stop after this epoch" once the validation metric stops improving.

The monitored metric and its direction are the run's selection rule (``train.checkpoint_metric``,
``train.checkpoint_mode``, default ``val/macro_f1``, max), so the epoch training stops at and the
checkpoint evaluation picks are decided by one rule, on validation only. An epoch *improves* when
its value beats the best so far by more than ``train.early_stopping.min_delta`` (a non-finite
value never does); after ``train.early_stopping.patience`` epochs in a row without an improvement
the run stops, at the end of that epoch, once its checkpoint is reported. The best checkpoint is
therefore ``patience`` epochs back, and Ray Train keeps it (``keep_checkpoints`` best by the same
metric, plus the newest).

**The record.** :meth:`EarlyStopping.after_epoch` returns ``{"early_stopping": {...}}``, which the
loop puts into every checkpoint's ``train_state.json`` (and DeepSpeed's client state): the rule,
the best value and epoch, the epochs without improvement, whether and when the run stopped, and
the per-epoch history of the validation metrics (:data:`CURVE_METRICS`), the learning curve that
``cliplung compare`` plots. A resumed run restores it from its checkpoint, so an interrupted run
stops where an uninterrupted one would; a run whose newest checkpoint says it stopped is complete
(:func:`stopped_early`, used by :func:`cliplung.train.trainer.train`), also when ``train.epochs``
is raised later.

Every worker computes the same metrics from the same gathered validation predictions, so every
worker takes the same decision and they leave the loop together.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from cliplung import storage
from cliplung.config import TrainConfig
from cliplung.train.preflight import TRAIN_STATE_FILE

__all__ = ["CURVE_METRICS", "STATE_KEY", "EarlyStopping", "read_train_state", "stopped_early"]

STATE_KEY = "early_stopping"
CURVE_METRICS = ("val/accuracy", "val/macro_f1", "val/auc", "train/loss")
"""Metrics whose per-epoch values the record keeps (besides the monitored one)."""


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


class EarlyStopping:
    """The early-stopping decision of one run; see the module docstring.

    ``resumed`` is the client state of the checkpoint a run resumes from (None for a new run).
    With ``train.early_stopping.patience`` None it never stops but still keeps the history.
    """

    def __init__(self, train: TrainConfig, resumed: Mapping[str, Any] | None = None) -> None:
        rule = train.early_stopping
        self.metric = train.checkpoint_metric
        self.mode = train.checkpoint_mode
        self.patience = rule.patience
        self.min_delta = float(rule.min_delta)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.stopped = False
        self.stopped_epoch: int | None = None
        self.history: dict[str, list[float | None]] = {"epoch": []}
        previous = (resumed or {}).get(STATE_KEY)
        if previous:
            self.best = _finite(previous.get("best"))
            self.best_epoch = previous.get("best_epoch")
            self.bad_epochs = int(previous.get("bad_epochs", 0))
            self.stopped = bool(previous.get("stopped", False))
            self.stopped_epoch = previous.get("stopped_epoch")
            self.history = {k: list(v) for k, v in (previous.get("history") or {"epoch": []}).items()}

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def after_epoch(self, epoch: int, report: Mapping[str, Any]) -> dict[str, Any]:
        """Take epoch ``epoch``'s report into account; returns the record to checkpoint. After it,
        :attr:`stopped` says whether training ends with this epoch."""
        if self.history["epoch"] and self.history["epoch"][-1] >= epoch:
            # A replayed epoch (a worker restart resumed from an older checkpoint): forget the later ones.
            keep = sum(1 for e in self.history["epoch"] if e < epoch)
            self.history = {k: v[:keep] for k, v in self.history.items()}
        self.history["epoch"].append(int(epoch))
        for name in dict.fromkeys((self.metric, *CURVE_METRICS)):
            column = self.history.setdefault(name, [None] * (len(self.history["epoch"]) - 1))
            column.append(_finite(report.get(name)))
        value = _finite(report.get(self.metric))
        if value is not None and self._improves(value):
            self.best, self.best_epoch, self.bad_epochs = value, int(epoch), 0
        else:
            self.bad_epochs += 1
        if self.patience is not None and self.bad_epochs >= self.patience:
            self.stopped, self.stopped_epoch = True, int(epoch)
        return self.state()

    def state(self) -> dict[str, Any]:
        """``{"early_stopping": record}`` (module docstring), JSON-serialisable."""
        return {
            STATE_KEY: {
                "metric": self.metric,
                "mode": self.mode,
                "patience": self.patience,
                "min_delta": self.min_delta,
                "best": self.best,
                "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs,
                "stopped": self.stopped,
                "stopped_epoch": self.stopped_epoch,
                "history": self.history,
            }
        }

    def summary(self) -> str:
        """One line for the console when the run stops."""
        best = "none" if self.best is None else f"{self.best:.4f}"
        epoch = "-" if self.best_epoch is None else self.best_epoch + 1
        return (
            f"early stopping after epoch {(self.stopped_epoch or 0) + 1}: {self.metric} has not improved by "
            f"more than {self.min_delta:g} for {self.bad_epochs} epochs (best {best} at epoch {epoch})"
        )


def read_train_state(checkpoint_location: str, endpoint: str | None = None) -> dict[str, Any] | None:
    """The ``train_state.json`` of a checkpoint directory (local or ``s3://``), or None."""
    try:
        text = storage.read_text(storage.join(checkpoint_location, TRAIN_STATE_FILE), endpoint)
    except FileNotFoundError:
        return None
    try:
        state = json.loads(text)
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def stopped_early(checkpoint_location: str, endpoint: str | None = None) -> dict[str, Any] | None:
    """The early-stopping record of a checkpoint when its run stopped with it, else None."""
    state = read_train_state(checkpoint_location, endpoint) or {}
    record = state.get(STATE_KEY) or {}
    return record if record.get("stopped") else None
