"""Plots and the self-contained HTML report of ``cliplung evaluate`` and ``cliplung compare``.

Figures are drawn with matplotlib's object API on the Agg canvas (``Figure`` + ``savefig``, no
``pyplot``): no display is needed, no global figure state is shared between threads or Ray tasks.
Every figure function returns PNG bytes; :func:`write_report` writes them as files and embeds them
as base64 in ``report.html``, which therefore opens anywhere on its own.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "attention_figure",
    "confusion_figure",
    "learning_curves_figure",
    "metric_bars_figure",
    "paired_figure",
    "reliability_figure",
    "roc_figure",
    "write_report",
]

DPI = 110


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str]) -> bytes:
    """Counts (and row shares) of true × predicted classes."""
    matrix = np.asarray(matrix, dtype=np.int64)
    n = len(class_names)
    fig = _figure(1.6 + 1.1 * n, 1.3 + 1.0 * n)
    ax = fig.add_subplot()
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{matrix[i, j]}\n{share[i, j]:.0%}",
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.55 else "black",
                fontsize=9,
            )
    ax.set_xticks(range(n), class_names)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    return _png(fig)


def roc_figure(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> bytes:
    """One-vs-rest ROC curves (2-class: the malignant curve alone); absent classes are skipped."""
    from sklearn.metrics import roc_curve

    from cliplung.train.metrics import weighted_binary_auc

    labels = np.asarray(labels)
    probs = np.asarray(probs)
    fig = _figure(4.2, 3.8)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    shown = [1] if len(class_names) == 2 else range(len(class_names))
    for c in shown:
        positive = labels == c
        if positive.all() or not positive.any():
            ax.plot([], [], label=f"{class_names[c]}: undefined (one class only)")
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, c])
        ax.plot(
            fpr,
            tpr,
            linewidth=1.6,
            label=f"{class_names[c]} (AUC {weighted_binary_auc(positive, probs[:, c], np.ones(len(positive)))[0]:.3f})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, one vs rest")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def reliability_figure(bins: Sequence[Mapping[str, Any]], ece: float | None) -> bytes:
    """Accuracy per equal-width confidence bin against the diagonal, with the bin counts below."""
    fig = _figure(4.2, 4.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    lo = np.array([b["lo"] for b in bins], dtype=float)
    width = np.array([b["hi"] - b["lo"] for b in bins], dtype=float)
    acc = np.array([np.nan if b["accuracy"] is None else b["accuracy"] for b in bins], dtype=float)
    conf = np.array([np.nan if b["confidence"] is None else b["confidence"] for b in bins], dtype=float)
    counts = np.array([b["count"] for b in bins], dtype=float)
    filled = counts > 0
    top.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    top.bar(
        lo[filled],
        acc[filled],
        width=width[filled],
        align="edge",
        edgecolor="black",
        alpha=0.8,
        label="accuracy",
    )
    top.bar(
        lo[filled],
        conf[filled] - acc[filled],
        bottom=acc[filled],
        width=width[filled],
        align="edge",
        color="tab:red",
        alpha=0.3,
        label="gap to confidence",
    )
    shown = "n/a" if ece is None or (isinstance(ece, float) and math.isnan(ece)) else f"{ece:.3f}"
    top.set_title(f"reliability (ECE {shown}, {len(bins)} bins)")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(lo, counts, width=width, align="edge", color="0.5")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top-class probability)")
    bottom.set_ylabel("nodules")
    return _png(fig)


ATTENTION_CMAP = "inferno"
"""Perceptually uniform (lightness rises steadily with the value), readable in greyscale print and
by colour-blind readers; unlike ``jet`` it has no bright bands that look like structure."""
ATTENTION_MAX_ALPHA = 0.6
"""Opacity of the strongest Grad-CAM value; weaker values fade out, so the CT stays readable."""


def _overlay(cam: np.ndarray) -> np.ndarray:
    """RGBA image of a [0, 1] map: colour from :data:`ATTENTION_CMAP`, opacity rising with the value."""
    from matplotlib import colormaps

    cam = np.clip(np.asarray(cam, dtype=np.float64), 0.0, 1.0)
    rgba = colormaps[ATTENTION_CMAP](cam)
    rgba[..., 3] = ATTENTION_MAX_ALPHA * cam
    return rgba


def attention_figure(
    slices: np.ndarray,
    cams: np.ndarray,
    captions: Sequence[str],
    classes: Sequence[int],
    class_names: Sequence[str],
    *,
    window: str | None = None,
) -> bytes:
    """One row per true class; per nodule two panels: the plain middle axial slice (grey, the
    store's HU window) and the same slice with its Grad-CAM as a semi-transparent overlay
    (:data:`ATTENTION_CMAP`, opacity rising with the map, a contour at half the peak), with a
    colour bar for the map."""
    slices = np.asarray(slices)
    by_class = {c: [i for i, k in enumerate(classes) if k == c] for c in range(len(class_names))}
    per_row = max([len(v) for v in by_class.values()] + [1])
    rows = len(class_names)
    fig = _figure(3.1 * per_row + 0.9, 1.9 * rows + 0.6)
    axes = np.atleast_2d(fig.subplots(rows, 2 * per_row, squeeze=False))
    for c in range(rows):
        for n in range(per_row):
            plain, over = axes[c, 2 * n], axes[c, 2 * n + 1]
            for ax in (plain, over):
                ax.set_xticks([])
                ax.set_yticks([])
            if n >= len(by_class[c]):
                plain.axis("off")
                over.axis("off")
                if n == 0:
                    plain.text(0.5, 0.5, f"no {class_names[c]} nodule", ha="center", va="center", fontsize=8)
                continue
            i = by_class[c][n]
            for ax in (plain, over):
                ax.imshow(slices[i], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            over.imshow(_overlay(cams[i]), interpolation="bilinear")
            if float(np.max(cams[i])) > 0.5:
                over.contour(cams[i], levels=[0.5], colors="cyan", linewidths=0.6)
            plain.set_title(captions[i], fontsize=6.5, loc="left")
            over.set_title("Grad-CAM", fontsize=6.5)
        axes[c, 0].set_ylabel(class_names[c], fontsize=9)
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(Normalize(0, 1), colormaps[ATTENTION_CMAP])
    bar = fig.colorbar(mappable, ax=axes, shrink=0.6, aspect=30, pad=0.01)
    bar.set_label("Grad-CAM (share of peak)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    title = "Middle axial slice, plain and with Grad-CAM (layer 4) of the predicted class"
    if window:
        title += f"; grey: {window}"
    fig.suptitle(title + "; cyan contour: half of the peak", fontsize=8)
    return _png(fig)


def learning_curves_figure(
    curves: Mapping[str, Sequence[Sequence[float | None]]],
    metric: str,
    stops: Mapping[str, Sequence[int | None]] | None = None,
) -> bytes:
    """One panel per method: each fold's validation ``metric`` by epoch (thin), their mean over the
    folds still training at that epoch (bold), and the epochs the folds stopped at (ticks)."""
    from matplotlib.ticker import MaxNLocator

    methods = list(curves)
    cols = min(4, max(1, len(methods)))
    rows = -(-len(methods) // cols) if methods else 1
    fig = _figure(2.7 * cols + 0.3, 2.2 * rows + 0.5)
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True))
    longest = max([len(c) for runs in curves.values() for c in runs] + [1])
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    for ax, method in zip(axes.flat, methods, strict=False):
        runs = [np.array([np.nan if v is None else v for v in c], dtype=float) for c in curves[method]]
        grid = np.full((len(runs), longest), np.nan)
        for r, values in enumerate(runs):
            grid[r, : len(values)] = values
            ax.plot(np.arange(1, len(values) + 1), values, color="0.65", linewidth=0.7)
        counts = np.isfinite(grid).sum(axis=0)
        with np.errstate(invalid="ignore"):
            mean = np.where(counts > 0, np.nansum(grid, axis=0) / np.maximum(counts, 1), np.nan)
        ax.plot(np.arange(1, longest + 1), mean, color="tab:blue", linewidth=1.8, label="mean over folds")
        for stop in (stops or {}).get(method, []):
            if stop:
                ax.axvline(stop, color="tab:red", linewidth=0.6, alpha=0.5)
        ax.set_title(method, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("epoch", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel(metric, fontsize=7)
    fig.suptitle(
        f"Learning curves: validation {metric} per fold (grey), mean over the folds still training (blue), "
        "last epoch of each fold (red)",
        fontsize=8,
    )
    return _png(fig)


def paired_figure(paired: Mapping[str, Sequence[Any]], baseline: str) -> bytes:
    """One panel per metric: each method's mean difference to ``baseline`` over folds (dot), its 95 %
    paired bootstrap interval (bar) and the per-fold differences (grey points)."""
    methods = list(paired)
    metrics = [r.metric for r in next(iter(paired.values()))] if methods else []
    fig = _figure(2.9 * max(1, len(metrics)) + 0.8, 0.45 * len(methods) + 1.3)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(metrics)), squeeze=False, sharey=True)[0])
    y = np.arange(len(methods))[::-1]
    for ax, m in zip(axes, range(len(metrics)), strict=False):
        for yi, method in zip(y, methods, strict=True):
            r = paired[method][m]
            d = [v for v in r.differences if math.isfinite(v)]
            ax.scatter(d, [yi] * len(d), s=9, color="0.6", zorder=2)
            if math.isfinite(r.mean):
                low, high = r.ci_low, r.ci_high
                if math.isfinite(low) and math.isfinite(high):
                    ax.plot([low, high], [yi, yi], color="tab:blue", linewidth=2.2, zorder=3)
                ax.scatter([r.mean], [yi], s=26, color="tab:blue", zorder=4)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"{metrics[m]}: method − {baseline}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, methods, fontsize=8)
    fig.suptitle(
        "Paired difference to the baseline: mean over folds (dot), 95 % paired bootstrap CI (bar), "
        "per-fold differences (grey)",
        fontsize=8,
    )
    return _png(fig)


def metric_bars_figure(
    summary: Mapping[str, Mapping[str, tuple[float, float]]], metrics: Sequence[str]
) -> bytes:
    """Grouped bars: for each metric, one bar per method at its mean with a ±std error bar.

    ``summary[method][metric] = (mean, std)``.
    """
    methods = list(summary)
    fig = _figure(1.2 + 1.3 * len(metrics) * max(1, len(methods)) / 2, 3.6)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(metrics))
    for m, method in enumerate(methods):
        means = [summary[method].get(k, (math.nan, math.nan))[0] for k in metrics]
        stds = [summary[method].get(k, (math.nan, math.nan))[1] for k in metrics]
        ax.bar(x + (m - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=method)
    ax.set_xticks(x, [f"{k}\n(lower is better)" if k == "ece" else k for k in metrics])
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean ± std over folds")
    ax.legend(fontsize=8, ncols=min(4, max(1, len(methods))))
    ax.set_title("cross-validated test metrics")
    return _png(fig)


# --------------------------------------------------------------------------- HTML


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 70em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.note { color: #a33; }
img { max-width: 100%; margin: 0.5em 1em 1em 0; vertical-align: top; }
"""


def _img(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'


def write_report(out_dir: str | Path, metrics: Mapping[str, Any], images: Mapping[str, bytes]) -> Path:
    """Write every PNG of ``images`` as ``<name>.png`` and ``report.html`` (PNGs embedded)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, png in images.items():
        (out / f"{name}.png").write_bytes(png)
    names = metrics.get("class_names", [])
    notes = []
    if metrics.get("simulated"):
        notes.append(f"Simulated data (source: {metrics.get('source')}): not an LIDC-IDRI result.")
    if metrics.get("held_out") is False:
        notes.append(f"Fold {metrics.get('fold')} was training data for this model: not a test result.")
    summary_rows = [
        ("checkpoint", metrics.get("checkpoint")),
        ("selected on", _selection_text(metrics.get("selection") or {})),
        ("store", metrics.get("store")),
        ("fold (test)", metrics.get("fold")),
        ("split check", (metrics.get("split_check") or {}).get("status")),
        (
            "task / method",
            f"{metrics.get('task')} / {metrics.get('method')} ({metrics.get('image_encoder')})",
        ),
        ("nodules", metrics.get("n")),
        ("accuracy", metrics.get("accuracy")),
        ("macro F1", metrics.get("macro_f1")),
        ("AUC", metrics.get("auc")),
        (f"ECE ({metrics.get('ece_bins')} bins)", metrics.get("ece")),
    ]
    per_class = metrics.get("per_class", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>cliplung evaluation: {html.escape(str(metrics.get('checkpoint')))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>cliplung evaluation</h1>",
        *[f"<p class='note'>{html.escape(n)}</p>" for n in notes],
        "<table>",
        *[f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in summary_rows],
        "</table><h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th>"
        "<th>F1</th><th>AUC (one vs rest)</th><th>support</th></tr>",
        *[
            f"<tr><td>{html.escape(n)}</td>"
            + "".join(
                f"<td>{_fmt(per_class[n].get(k))}</td>"
                for k in ("precision", "recall", "f1", "auc", "support")
            )
            + "</tr>"
            for n in names
            if n in per_class
        ],
        "</table><h2>Figures</h2>",
        *[_img(name, png) for name, png in images.items() if name != "attention"],
    ]
    if "attention" in images:
        parts += [
            "<h2>Attention maps</h2>",
            "<p>Grad-CAM of the image encoder's layer 4 for the predicted class, drawn over each nodule's "
            "middle axial slice (right of each pair; the plain slice left of it), with opacity rising "
            "with the map so the CT stays visible; per true class, the nodules the model rates most "
            "likely for their own class. "
            + (
                "The 2D encoder reads the slices as channels, so its map is in-plane only (one map for "
                "the whole patch)."
                if (metrics.get("attention") or {}).get("in_plane_only")
                else "The 3D encoder's map is shown at the middle axial slice."
            )
            + "</p>",
            _img("attention", images["attention"]),
        ]
    parts.append("</body></html>\n")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _selection_text(selection: Mapping[str, Any]) -> str:
    if selection.get("metric"):
        return (
            f"best {selection['metric']} ({selection.get('mode')}) = {_fmt(selection.get('value'))} "
            f"at epoch {selection.get('epoch')} of {len(selection.get('candidates') or [])} checkpoints"
        )
    return "given checkpoint"
