"""``cliplung evaluate``: score the held-out test fold with a trained model's EMA inference export.

::

    cliplung evaluate --run debug --storage runs --data stores/phantom --out reports/debug
    cliplung evaluate --checkpoint runs/debug/epoch_0001/model.pt --data stores/phantom --out reports/x

**Which checkpoint**: :func:`cliplung.runs.find_checkpoint` (a run's best by its *validation*
metric, never a test one; or the ``model.pt`` / checkpoint directory named), loaded by
:mod:`cliplung.evaluate.checkpoints` (inference export only, ``weights_only=True``).

**Which rows**: the nodules of fold ``K`` (default: the checkpoint config's ``data.test_fold``,
the fold its training never saw), labelled by the config's ``data.unsure_range`` and kept as its
test task defines them (``data.test_task``, default ``data.task``; :mod:`cliplung.labels`). A
3-class model scored on 2 classes has its probabilities conditioned on "not unsure"
(:func:`cliplung.labels.map_probabilities`); ``predictions.csv`` then also keeps the model's own
three (``model_p_*``). When the
run's ``splits.json`` is at hand the rows are checked against it (:mod:`cliplung.evaluate.splits`).
Evaluating a fold other than the model's test fold is allowed but marked ``"held_out": false``.

**Metrics**: :mod:`cliplung.evaluate.metrics` (the headline ones are training's validation
metrics; plus per-class numbers, the confusion matrix and the expected calibration error).

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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliplung.config import Config
from cliplung.data.preprocessing import check_preprocessing, store_preprocessing
from cliplung.data.store import NoduleStore, StoreError
from cliplung.evaluate.checkpoints import CheckpointError, load_checkpoint, open_checkpoint
from cliplung.evaluate.metrics import ECE_BINS, compute_metrics
from cliplung.evaluate.splits import SplitLeakError, fold_rows, split_check
from cliplung.labels import describe_rule, map_probabilities, setting_name

__all__ = [
    "CheckpointError",
    "SplitLeakError",
    "evaluate",
    "load_checkpoint",
    "open_checkpoint",
    "predict_probabilities",
    "read_patches",
]

ATTENTION_PER_CLASS = 3


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
    path: Path,
    store: NoduleStore,
    rows: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    class_names,
    model_probs: np.ndarray | None = None,
    model_class_names=(),
) -> None:
    """One row per nodule; ``model_p_*`` columns when the scored probabilities are mapped ones."""
    ids = store.read(("nodule_id", "patient_id"), indices=rows)
    raw = model_probs is not None
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "row",
                "nodule_id",
                "patient_id",
                "label",
                "predicted",
                *[f"p_{n}" for n in class_names],
                *([f"model_p_{n}" for n in model_class_names] if raw else []),
            ]
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
                    *([f"{p:.6f}" for p in model_probs[i]] if raw else []),
                ]
            )


def _report_images(
    model, store, rows, labels, probs, patches, class_names, metrics, per_class: int, model_class_names
):
    """The report's figures (confusion matrix, ROC, reliability, Grad-CAM of the clearest cases)
    and the attention record for ``metrics.json``. Grad-CAM explains the model's own predicted
    class (``model_class_names``), which may be "unsure" when the test task has two classes."""
    from cliplung.evaluate import report
    from cliplung.evaluate.attention import axial_cams, grad_cam, middle_axial_slice

    picks = _attention_rows(labels, probs, per_class)
    cams, targets = grad_cam(model, torch.from_numpy(patches[picks]))
    slices = np.stack([middle_axial_slice(p) for p in patches[picks]]) if picks else np.zeros((0, 1, 1))
    ids = store.read(("nodule_id",), indices=rows[picks])["nodule_id"] if picks else []
    captions = [
        f"{ids[i]}\ntrue {class_names[labels[p]]}, pred {model_class_names[targets[i]]}"
        + (f" ({probs[p, targets[i]]:.2f})" if model_class_names == tuple(class_names) else "")
        for i, p in enumerate(picks)
    ]
    images = {
        "confusion_matrix": report.confusion_figure(np.asarray(metrics["confusion_matrix"]), class_names),
        "roc": report.roc_figure(labels, probs, class_names),
        "reliability": report.reliability_figure(metrics["reliability"], metrics["ece"]),
        "attention": report.attention_figure(
            slices,
            axial_cams(cams),
            captions,
            [int(labels[p]) for p in picks],
            class_names,
            window=_window_text(store),
        ),
    }
    return images, [str(i) for i in ids]


def _window_text(store: NoduleStore) -> str | None:
    window = store.attrs.get("hu_window")
    if not isinstance(window, list | tuple) or len(window) != 2:
        return None
    return f"HU {float(window[0]):g} (black) to {float(window[1]):g} (white)"


def _test_rows(store: NoduleStore, config: Config, fold: int | None, model_path: str):
    """(fold, held out?, rows, labels) of the fold to score."""
    test_fold = config.data.test_fold if fold is None else int(fold)
    held_out = test_fold == config.data.test_fold
    if not held_out:
        print(
            f"warning: evaluating fold {test_fold}, but {model_path} held out fold "
            f"{config.data.test_fold}: fold {test_fold} was training data, these are not test results",
            file=sys.stderr,
        )
    rows, labels = fold_rows(store, test_fold, config.data.scored_task, config.data.unsure_range)
    if len(rows) == 0:
        raise StoreError(
            f"store {store.path}: fold {test_fold} has no nodules for the {config.data.scored_task} task"
        )
    return test_fold, held_out, rows, labels


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

    model, config, choice = open_checkpoint(checkpoint_or_run, storage=storage, endpoint=endpoint)
    if not isinstance(store, NoduleStore):
        store = NoduleStore.open(str(store), endpoint=endpoint)
    check_preprocessing(
        store_preprocessing(store), config.prepare, source=f"store {store.path}", checkpoint=choice.model_path
    )
    test_fold, held_out, rows, labels = _test_rows(store, config, fold, choice.model_path)
    isolation = split_check(choice, store, test_fold, rows, held_out)
    data = config.data
    class_names, model_class_names = data.test_class_names, data.class_names
    patches = read_patches(store, rows)
    model_probs = predict_probabilities(model, patches, batch_size=batch_size)
    probs = map_probabilities(model_probs, data.task, data.scored_task)
    mapped = data.scored_task != data.task
    metrics = compute_metrics(labels, probs, class_names, n_bins=n_bins)
    result: dict[str, Any] = {
        "checkpoint": choice.model_path,
        "selection": choice.describe(),
        "store": store.path,
        "source": store.attrs.get("source"),
        "simulated": bool(store.attrs.get("simulated", store.attrs.get("source") != "lidc")),
        "fold": test_fold,
        "held_out": held_out,
        "split_check": isolation,
        "task": data.scored_task,
        "train_task": data.task,
        "setting": setting_name(data.unsure_range, data.task, data.scored_task),
        "label_rule": describe_rule(data.unsure_range),
        "probabilities": (
            "the model's 3 conditioned on not unsure: p(malignant) / (p(benign) + p(malignant))"
            if mapped
            else "the model's own"
        ),
        "method": config.model.method,
        "image_encoder": config.model.image_encoder,
        "class_names": list(class_names),
        **metrics,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_predictions(
        out / "predictions.csv",
        store,
        rows,
        labels,
        probs,
        class_names,
        model_probs if mapped else None,
        model_class_names,
    )
    images, attended = _report_images(
        model,
        store,
        rows,
        labels,
        probs,
        patches,
        class_names,
        metrics,
        attention_per_class,
        model_class_names,
    )
    result["attention"] = {
        "method": "Grad-CAM of the image encoder's layer 4 for the predicted class",
        "in_plane_only": config.model.image_encoder == "resnet18_2d",
        "nodules": attended,
    }
    result = _jsonable(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    report.write_report(out, result, images)
    return result
