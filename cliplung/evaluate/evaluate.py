"""``cliplung evaluate``: score the held-out test fold with a trained model's EMA inference export.

::

    cliplung evaluate --run debug --storage runs --data stores/phantom --out reports/debug
    cliplung evaluate --checkpoint runs/debug/epoch_0001/model.pt --data stores/phantom --out reports/x

**Which checkpoint.** ``--checkpoint`` names an inference export (``model.pt``), the checkpoint
directory holding one, or a run directory. ``--run NAME --storage DIR`` (or a run directory) picks,
among the run's complete checkpoints (``epoch_NNNN/`` with ``model.pt`` and ``train_state.json``), the
best by the run's ``train.checkpoint_metric`` / ``train.checkpoint_mode`` as recorded in each
``train_state.json``: a validation metric (``val/macro_f1`` by default), never a test one; ties go to
the later epoch. Only the inference export is loaded (image encoder + head, no text tower), with
``torch.load(weights_only=True)``.

**Which rows.** The nodules of fold ``K`` (default: the checkpoint config's ``data.test_fold``, the
fold its training never saw). For the 2-class task unsure nodules (label 1) are dropped and
malignant becomes 1, exactly as :mod:`cliplung.data.ingest` builds its splits. When the run's
``splits.json`` is at hand the evaluated rows are checked against it: a test row or test patient that
the run trained or validated on is an error (:class:`SplitLeakError`). Evaluating a fold other than
the model's test fold is allowed but marked ``"held_out": false`` (its nodules were training data).

**Metrics** (scikit-learn unless said): accuracy; per class precision, recall, F1 (0 where a ratio
is undefined, scikit-learn's ``zero_division=0``, as the validation metric that selected the
checkpoint) and support; macro-F1 (unweighted mean of the per-class F1); one-vs-rest ROC AUC per
class (NaN when the class is absent, or the only one) and ``auc`` (2-class: AUC of the malignant
probability; 3-class: macro one-vs-rest AUC, NaN unless every class is present, as in
:func:`cliplung.train.metrics.classification_metrics`); the confusion matrix (rows true class,
columns predicted); and the expected calibration error:

    ECE = Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|

over ``n_bins`` (10) equal-width bins of the top-class probability (*confidence*), bin ``b``
covering ``(b/n, (b+1)/n]`` (bin 0 also holds 0); ``acc`` is the share of correct top-class
predictions in the bin and ``conf`` its mean confidence (Guo et al., 2017). Equal-width bins make
the reliability diagram read directly; with test folds of tens of nodules many bins stay empty
and ECE is a coarse number: it is reported with its per-bin counts.

**Outputs** in ``out_dir``: ``metrics.json`` (NaN written as ``null``), ``predictions.csv`` (one
row per nodule), ``report.html`` (self-contained: the PNGs are embedded as base64) and the PNGs
themselves (confusion matrix, ROC curves, reliability diagram, Grad-CAM attention maps, see
:mod:`cliplung.evaluate.attention`).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliplung import storage as storage_lib
from cliplung.config import Config, ConfigError, config_from_dict
from cliplung.data.store import NoduleStore, StoreError
from cliplung.model.export import FORMAT, load_inference
from cliplung.model.image_encoder import NoduleClassifier

__all__ = [
    "CHECKPOINT_FILE",
    "ECE_BINS",
    "CheckpointChoice",
    "CheckpointError",
    "SplitLeakError",
    "check_split_isolation",
    "compute_metrics",
    "evaluate",
    "expected_calibration_error",
    "fold_rows",
    "load_checkpoint",
    "open_checkpoint",
    "predict_probabilities",
    "resolve_checkpoint",
    "select_best_checkpoint",
]

ECE_BINS = 10
CHECKPOINT_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.json"
SPLITS_FILE = "splits.json"
RUN_CONFIG_FILE = "config.yaml"
CHECKPOINT_GLOB = "epoch_*"
ATTENTION_PER_CLASS = 3


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model its config describes."""


class SplitLeakError(RuntimeError):
    """A test-fold nodule or patient took part in training or validation."""


# --------------------------------------------------------------------------- checkpoints


def load_checkpoint(path: str | Path, *, name: str | None = None) -> tuple[NoduleClassifier, Config]:
    """The inference model and its config from a ``model.pt`` (or the checkpoint dir holding one).

    Loads with ``torch.load(weights_only=True)`` (no pickled code runs). Every failure is a
    :class:`CheckpointError` naming the file (``name`` when the file is a local copy of a remote one).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    shown = name or str(path)
    if not path.is_file():
        raise CheckpointError(f"{shown}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... for bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{shown}: not a readable checkpoint (truncated, corrupt, or not a weights-only torch file): "
            f"{type(exc).__name__}: {reason}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{shown}: not a {FORMAT} export (expected the model.pt that training writes into every "
            "checkpoint directory)"
        )
    try:
        config_from_dict(payload.get("config") or {})
    except (ConfigError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{shown}: the config stored in the checkpoint is invalid: {exc}") from None
    try:
        model, config = load_inference(payload)
    except RuntimeError as exc:  # load_state_dict: missing / unexpected keys, shape mismatches
        detail = " ".join(str(exc).split())
        if len(detail) > 400:
            detail = detail[:400] + " ..."
        raise CheckpointError(
            f"{shown}: its weights do not fit the model its stored config describes (saved from another "
            f"model configuration?): {detail}"
        ) from None
    except ValueError as exc:
        raise CheckpointError(f"{shown}: {exc}") from None
    return model, config


@dataclass(frozen=True)
class CheckpointChoice:
    """Which ``model.pt`` was chosen, and why."""

    model_path: str
    """Location of the inference export (local path or ``s3://``)."""
    run_dir: str | None = None
    """The run directory the checkpoint belongs to, when known (holds ``splits.json``)."""
    epoch: int | None = None
    metric: str | None = None
    """Selection metric (``train.checkpoint_metric``) when chosen among a run's checkpoints."""
    mode: str | None = None
    value: float | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    """Every complete checkpoint considered: ``{"checkpoint", "epoch", "value"}``."""


def _fs(location: str, endpoint: str | None):
    return storage_lib.fsspec_filesystem(location, endpoint), storage_lib.parse_location(location).path


def _display(location: str, fs_path: str) -> str:
    return f"s3://{fs_path}" if storage_lib.is_s3(location) else fs_path


def resolve_checkpoint(
    checkpoint_or_run: str | Path, *, storage: str | None = None, endpoint: str | None = None
) -> CheckpointChoice:
    """Find the ``model.pt`` meant by ``checkpoint_or_run``.

    With ``storage``: ``checkpoint_or_run`` is a run name and the run's best checkpoint is chosen
    (see the module docstring). Without: a ``model.pt``, a checkpoint directory or a run directory
    (local or ``s3://``).
    """
    target = str(checkpoint_or_run)
    if storage is not None:
        if not target or "/" in target:
            raise ConfigError(f"--run: expected a run name (no '/'), got {target!r}")
        return select_best_checkpoint(storage_lib.join(str(storage), target), endpoint=endpoint)
    fs, path = _fs(target, endpoint)
    if not fs.exists(path):
        raise CheckpointError(f"{target}: no such checkpoint file or directory")
    if fs.isfile(path):
        ckpt_dir = path.rsplit("/", 1)[0]
        return CheckpointChoice(model_path=_display(target, path), run_dir=_run_dir_of(fs, target, ckpt_dir))
    if fs.exists(f"{path}/{CHECKPOINT_FILE}"):
        return CheckpointChoice(
            model_path=_display(target, f"{path}/{CHECKPOINT_FILE}"), run_dir=_run_dir_of(fs, target, path)
        )
    if fs.glob(f"{path}/{CHECKPOINT_GLOB}"):
        return select_best_checkpoint(target, endpoint=endpoint)
    raise CheckpointError(
        f"{target}: neither a {CHECKPOINT_FILE}, a checkpoint directory holding one, nor a run directory "
        f"with {CHECKPOINT_GLOB}/ checkpoints"
    )


def _run_dir_of(fs, location: str, ckpt_dir: str) -> str | None:
    parent = ckpt_dir.rstrip("/").rsplit("/", 1)[0]
    return _display(location, parent) if fs.exists(f"{parent}/{SPLITS_FILE}") else None


def _run_selection_rule(fs, run_path: str, first_ckpt: str) -> tuple[str, str]:
    """(metric, mode) from the run's config.yaml, else the first checkpoint's, else the defaults."""
    import yaml

    for candidate in (f"{run_path}/{RUN_CONFIG_FILE}", f"{first_ckpt}/{RUN_CONFIG_FILE}"):
        if fs.exists(candidate):
            data = yaml.safe_load(fs.cat_file(candidate)) or {}
            train = data.get("train") or {}
            default = Config().train
            return (
                str(train.get("checkpoint_metric", default.checkpoint_metric)),
                str(train.get("checkpoint_mode", default.checkpoint_mode)),
            )
    default = Config().train
    return default.checkpoint_metric, default.checkpoint_mode


def select_best_checkpoint(
    run_dir: str, *, endpoint: str | None = None, metric: str | None = None, mode: str | None = None
) -> CheckpointChoice:
    """The run's best complete checkpoint by its validation ``metric`` (default: the run's
    ``train.checkpoint_metric`` and ``train.checkpoint_mode``); ties go to the later epoch."""
    fs, path = _fs(run_dir, endpoint)
    if not fs.exists(path):
        raise CheckpointError(f"{run_dir}: no such run directory")
    complete = []
    for ckpt in sorted(fs.glob(f"{path}/{CHECKPOINT_GLOB}")):
        # A checkpoint still being uploaded lacks one of the two; it is not a candidate.
        if fs.exists(f"{ckpt}/{TRAIN_STATE_FILE}") and fs.exists(f"{ckpt}/{CHECKPOINT_FILE}"):
            complete.append(ckpt)
    if not complete:
        raise CheckpointError(
            f"{run_dir}: no complete checkpoint ({CHECKPOINT_GLOB}/ with {CHECKPOINT_FILE} and "
            f"{TRAIN_STATE_FILE}); has the run finished an epoch?"
        )
    run_metric, run_mode = _run_selection_rule(fs, path, complete[0])
    metric, mode = metric or run_metric, mode or run_mode
    if metric.split("/", 1)[0].startswith("test"):
        raise ConfigError(f"train.checkpoint_metric: {metric!r} is a test metric; select on validation")
    if mode not in ("max", "min"):
        raise ConfigError(f"train.checkpoint_mode: must be 'max' or 'min', got {mode!r}")
    candidates = []
    for ckpt in complete:
        try:
            state = json.loads(fs.cat_file(f"{ckpt}/{TRAIN_STATE_FILE}"))
        except (ValueError, OSError) as exc:
            raise CheckpointError(
                f"{_display(run_dir, ckpt)}/{TRAIN_STATE_FILE}: unreadable ({exc})"
            ) from None
        value = (state.get("metrics") or {}).get(metric)
        value = float(value) if isinstance(value, int | float) and math.isfinite(value) else None
        candidates.append(
            {"checkpoint": _display(run_dir, ckpt), "epoch": state.get("epoch"), "value": value}
        )
    scored = [c for c in candidates if c["value"] is not None]
    if not scored:
        raise CheckpointError(
            f"{run_dir}: no checkpoint records a finite {metric!r} in its {TRAIN_STATE_FILE}; cannot select one"
        )
    sign = 1.0 if mode == "max" else -1.0
    best = max(scored, key=lambda c: (sign * c["value"], c["epoch"] if c["epoch"] is not None else -1))
    return CheckpointChoice(
        model_path=f"{best['checkpoint']}/{CHECKPOINT_FILE}",
        run_dir=_display(run_dir, path),
        epoch=best["epoch"],
        metric=metric,
        mode=mode,
        value=best["value"],
        candidates=candidates,
    )


def open_checkpoint(
    checkpoint_or_run: str | Path, *, storage: str | None = None, endpoint: str | None = None
) -> tuple[NoduleClassifier, Config, CheckpointChoice]:
    """:func:`resolve_checkpoint`, then :func:`load_checkpoint` (an ``s3://`` file via a temporary copy)."""
    choice = resolve_checkpoint(checkpoint_or_run, storage=storage, endpoint=endpoint)
    if not storage_lib.is_s3(choice.model_path):
        model, config = load_checkpoint(choice.model_path)
        return model, config, choice
    fs, remote = _fs(choice.model_path, endpoint)
    with tempfile.TemporaryDirectory(prefix="cliplung-ckpt-") as tmp:
        local = Path(tmp) / CHECKPOINT_FILE
        fs.get(remote, str(local))
        model, config = load_checkpoint(local, name=choice.model_path)
    return model, config, choice


# --------------------------------------------------------------------------- rows and scores


def fold_rows(store: NoduleStore, fold: int, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Store rows of fold ``fold`` and their labels as the task's class indices.

    ``2class`` drops unsure nodules (label 1) and maps malignant (2) to 1, exactly as the test split
    of :func:`cliplung.data.ingest.compute_splits` and its datasource do.
    """
    meta = store.read_rows(0, store.num_nodules, fields=("fold", "label"))
    folds = np.asarray(meta["fold"]).astype(np.int64)
    labels = np.asarray(meta["label"]).astype(np.int64)
    n_folds = int(folds.max()) + 1 if len(folds) else 0
    if not 0 <= fold < n_folds:
        raise ConfigError(f"--fold: store {store.path} has folds 0..{n_folds - 1}, got {fold}")
    keep = labels != 1 if task == "2class" else np.ones(len(labels), dtype=bool)
    rows = np.flatnonzero(keep & (folds == fold))
    y = labels[rows]
    if task == "2class":
        y = (y == 2).astype(np.int64)
    return rows, y


def check_patch_size(store: NoduleStore, config: Config, checkpoint: str) -> None:
    """Raise :class:`StoreError` when the store's patches are not the size the model was built for."""
    size = int(store.attrs.get("patch_size", -1))
    if size != config.prepare.patch_size:
        raise StoreError(
            f"store {store.path} holds {size}^3 patches but checkpoint {checkpoint} was trained on "
            f"{config.prepare.patch_size}^3 patches (prepare.patch_size); use a store built with "
            f"--patch-size {config.prepare.patch_size}"
        )


def read_patches(store: NoduleStore, rows: np.ndarray, chunk: int = 256) -> np.ndarray:
    """float32 patches of ``rows`` (in that order), read ``chunk`` rows at a time."""
    parts = [
        np.asarray(store.read(("patches",), indices=rows[i : i + chunk])["patches"], dtype=np.float32)
        for i in range(0, len(rows), chunk)
    ]
    p = int(store.attrs.get("patch_size", 0))
    return np.concatenate(parts) if parts else np.zeros((0, p, p, p), dtype=np.float32)


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module, patches: np.ndarray | torch.Tensor, *, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """Softmax probabilities ``(N, C)`` (float64) of ``patches`` ``(N, D, H, W)`` in [0, 1]."""
    model.eval()
    if isinstance(patches, np.ndarray) and not patches.flags.writeable:
        patches = patches.copy()  # Ray Data hands out read-only views; torch wants writable memory
    x = torch.as_tensor(patches, dtype=torch.float32)
    out = []
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(device))
        out.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
    if not out:
        return np.zeros((0, model.head.out_features), dtype=np.float64)
    return np.concatenate(out)


# --------------------------------------------------------------------------- metrics


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
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != n_classes or len(labels) != len(probs):
        raise ValueError(
            f"expected probs (N, {n_classes}) and labels (N,), got {probs.shape} and {labels.shape}"
        )
    if len(labels) == 0:
        raise ValueError("no nodules to evaluate")
    classes = list(range(n_classes))
    preds = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=classes, zero_division=0
    )
    present = set(np.unique(labels).tolist())
    per_class: dict[str, dict[str, float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c, name in enumerate(class_names):
            positives = int(support[c])
            auc_c = (
                float(roc_auc_score(labels == c, probs[:, c])) if 0 < positives < len(labels) else math.nan
            )
            per_class[name] = {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": positives,
                "auc": auc_c,
            }
        if len(present) < n_classes:
            auc = math.nan
        elif n_classes == 2:
            auc = float(roc_auc_score(labels, probs[:, 1]))
        else:
            auc = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=classes))
    ece, bins = expected_calibration_error(labels, probs, n_bins)
    return {
        "n": len(labels),
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0)),
        "auc": auc,
        "ece": ece,
        "ece_bins": n_bins,
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(labels, preds, labels=classes).tolist(),
        "reliability": bins,
    }


# --------------------------------------------------------------------------- split checks


def check_split_isolation(manifest: dict[str, Any], store: NoduleStore, fold: int) -> dict[str, Any]:
    """Prove from a run's ``splits.json`` that no nodule or patient of ``fold`` was trained or
    validated on. Raises :class:`SplitLeakError` naming the first offender; returns counts."""
    meta = store.read(("fold", "patient_id"))
    folds = np.asarray(meta["fold"]).astype(np.int64)
    patients = np.asarray(meta["patient_id"]).astype(str)
    n = len(folds)
    rows = {
        k: np.asarray(manifest.get(k, []), dtype=np.int64) for k in ("train_rows", "val_rows", "test_rows")
    }
    for key, values in rows.items():
        if values.size and (values.min() < 0 or values.max() >= n):
            raise SplitLeakError(
                f"{key} of the run's {SPLITS_FILE} point outside store {store.path} (0..{n - 1})"
            )
    fold_patients = set(patients[folds == fold].tolist())
    for key in ("train_rows", "val_rows"):
        in_fold = rows[key][folds[rows[key]] == fold]
        if in_fold.size:
            r = int(in_fold[0])
            raise SplitLeakError(
                f"store row {r} ({patients[r]}) is in fold {fold}, the test fold, but in the run's {key}"
            )
        leaked = sorted(set(patients[rows[key]].tolist()) & fold_patients)
        if leaked:
            raise SplitLeakError(f"test-fold patient {leaked[0]} has nodules in the run's {key}")
    recorded = set(manifest.get("test_patients", []))
    if recorded and recorded - fold_patients:
        other = sorted(recorded - fold_patients)[0]
        raise SplitLeakError(
            f"the run records test patient {other}, who is not in fold {fold} of {store.path}"
        )
    outside = rows["test_rows"][folds[rows["test_rows"]] != fold]
    if outside.size:
        raise SplitLeakError(f"the run's test row {int(outside[0])} is not in fold {fold} of {store.path}")
    return {
        "train_rows": int(rows["train_rows"].size),
        "val_rows": int(rows["val_rows"].size),
        "test_rows": int(rows["test_rows"].size),
        "test_patients": len(fold_patients),
        "leaks": 0,
    }


def _read_manifest(run_dir: str, endpoint: str | None) -> dict[str, Any] | None:
    fs, path = _fs(run_dir, endpoint)
    if not fs.exists(f"{path}/{SPLITS_FILE}"):
        return None
    return json.loads(fs.cat_file(f"{path}/{SPLITS_FILE}"))


def _split_check(
    choice: CheckpointChoice,
    store: NoduleStore,
    fold: int,
    rows: np.ndarray,
    held_out: bool,
    endpoint: str | None,
) -> dict[str, Any]:
    if choice.run_dir is None:
        return {"status": "skipped", "reason": f"no {SPLITS_FILE} next to the checkpoint"}
    manifest = _read_manifest(choice.run_dir, endpoint)
    if manifest is None:
        return {"status": "skipped", "reason": f"{choice.run_dir} has no {SPLITS_FILE}"}
    recorded_store = manifest.get("store")
    same_store = recorded_store is None or _same_location(str(recorded_store), store.path)
    if not same_store:
        return {"status": "skipped", "reason": f"the run trained on {recorded_store}, not {store.path}"}
    if not held_out:
        return {"status": "not held out", "reason": f"fold {fold} is not the run's test fold"}
    counts = check_split_isolation(manifest, store, fold)
    if sorted(manifest.get("test_rows", [])) != sorted(rows.tolist()):
        raise SplitLeakError(
            f"the run's {SPLITS_FILE} records {len(manifest.get('test_rows', []))} test rows, fold {fold} of "
            f"{store.path} has {len(rows)}: the store changed since training"
        )
    return {"status": "ok", **counts}


def _same_location(a: str, b: str) -> bool:
    try:
        return storage_lib.parse_location(a).url.rstrip("/") == storage_lib.parse_location(b).url.rstrip("/")
    except storage_lib.StorageError:
        return a.rstrip("/") == b.rstrip("/")


# --------------------------------------------------------------------------- evaluate


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _attention_rows(labels: np.ndarray, probs: np.ndarray, per_class: int) -> list[int]:
    """Up to ``per_class`` positions per true class: those the model rates most likely for their own
    class (its clearest cases), in class order."""
    chosen = []
    for c in range(probs.shape[1]):
        where = np.flatnonzero(labels == c)
        order = where[np.argsort(-probs[where, c], kind="stable")]
        chosen.extend(order[:per_class].tolist())
    return chosen


def _write_predictions(
    path: Path, store: NoduleStore, rows: np.ndarray, labels: np.ndarray, probs: np.ndarray, class_names
) -> None:
    ids = store.read(("nodule_id", "patient_id"), indices=rows)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["row", "nodule_id", "patient_id", "label", "predicted", *[f"p_{n}" for n in class_names]]
        )
        for i, r in enumerate(rows.tolist()):
            writer.writerow(
                [
                    r,
                    ids["nodule_id"][i],
                    ids["patient_id"][i],
                    class_names[labels[i]],
                    class_names[int(probs[i].argmax())],
                    *[f"{p:.6f}" for p in probs[i]],
                ]
            )


def evaluate(
    checkpoint_or_run: str | Path,
    store: str | NoduleStore,
    *,
    fold: int | None = None,
    out_dir: str | Path,
    endpoint: str | None = None,
    storage: str | None = None,
    n_bins: int = ECE_BINS,
    attention_per_class: int = ATTENTION_PER_CLASS,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Evaluate a checkpoint (or a run's best one, with ``storage``) on fold ``fold`` of ``store``.

    Writes ``metrics.json``, ``predictions.csv``, ``report.html`` and PNGs to ``out_dir`` (local) and
    returns the metrics dict. ``endpoint`` is the S3 endpoint of the store and the run storage.
    """
    from cliplung.evaluate import report
    from cliplung.evaluate.attention import axial_cams, grad_cam, middle_axial_slice

    model, config, choice = open_checkpoint(checkpoint_or_run, storage=storage, endpoint=endpoint)
    if not isinstance(store, NoduleStore):
        store = NoduleStore.open(str(store), endpoint=endpoint)
    check_patch_size(store, config, choice.model_path)
    test_fold = config.data.test_fold if fold is None else int(fold)
    held_out = test_fold == config.data.test_fold
    if not held_out:
        print(
            f"warning: evaluating fold {test_fold}, but {choice.model_path} held out fold "
            f"{config.data.test_fold}: fold {test_fold} was training data, these are not test results",
            file=sys.stderr,
        )
    class_names = config.data.class_names
    rows, labels = fold_rows(store, test_fold, config.data.task)
    if len(rows) == 0:
        raise StoreError(
            f"store {store.path}: fold {test_fold} has no nodules for the {config.data.task} task"
        )
    split_check = _split_check(choice, store, test_fold, rows, held_out, endpoint)

    patches = read_patches(store, rows)
    probs = predict_probabilities(model, patches, batch_size=batch_size)
    metrics = compute_metrics(labels, probs, class_names, n_bins=n_bins)
    result: dict[str, Any] = {
        "checkpoint": choice.model_path,
        "selection": {k: v for k, v in asdict(choice).items() if k not in ("model_path",)},
        "store": store.path,
        "source": store.attrs.get("source"),
        "simulated": bool(store.attrs.get("simulated", store.attrs.get("source") != "lidc")),
        "fold": test_fold,
        "held_out": held_out,
        "split_check": split_check,
        "task": config.data.task,
        "method": config.model.method,
        "image_encoder": config.model.image_encoder,
        "class_names": list(class_names),
        **metrics,
    }

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_predictions(out / "predictions.csv", store, rows, labels, probs, class_names)
    picks = _attention_rows(labels, probs, attention_per_class)
    cams, targets = grad_cam(model, torch.from_numpy(patches[picks]))
    slices = np.stack([middle_axial_slice(p) for p in patches[picks]]) if picks else np.zeros((0, 1, 1))
    ids = store.read(("nodule_id",), indices=rows[picks])["nodule_id"] if picks else []
    captions = [
        f"{ids[i]}\ntrue {class_names[labels[p]]}, pred {class_names[targets[i]]} ({probs[p, targets[i]]:.2f})"
        for i, p in enumerate(picks)
    ]
    images = {
        "confusion_matrix": report.confusion_figure(np.asarray(metrics["confusion_matrix"]), class_names),
        "roc": report.roc_figure(labels, probs, class_names),
        "reliability": report.reliability_figure(metrics["reliability"], metrics["ece"]),
        "attention": report.attention_figure(
            slices, axial_cams(cams), captions, [int(labels[p]) for p in picks], class_names
        ),
    }
    result["attention"] = {
        "method": "Grad-CAM of the image encoder's layer 4 for the predicted class",
        "in_plane_only": config.model.image_encoder == "resnet18_2d",
        "nodules": [str(i) for i in ids],
    }
    result = _jsonable(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    report.write_report(out, result, images)
    return result
