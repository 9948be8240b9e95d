"""``cliplung cv`` and ``cliplung compare``: patient-level k-fold cross-validation.

::

    cliplung cv --config debug --data stores/phantom --folds 5 --storage runs --name debug
    cliplung compare --config debug --data stores/phantom --folds 5 --storage runs --name cmp \\
        --methods ce,coop,cocoop,cliplung --out reports/cmp

**One fold** ``k`` of one method: the training config with ``data.test_fold=k`` (and
``model.method``), run name ``<name>-fold<k>`` (``compare``: ``<name>-<method>-fold<k>``), trained by
:func:`cliplung.train.trainer.train`, which holds out fold ``k`` and takes its validation patients
from the other folds. The run's recorded ``splits.json`` is then checked against the store's
``fold`` array (:func:`~cliplung.evaluate.evaluate.check_split_isolation`: no fold-``k`` nodule or
patient among the training or validation rows, else :class:`SplitLeakError`), and fold ``k`` is
scored by :func:`~cliplung.evaluate.evaluate.evaluate` with the run's best checkpoint by its
*validation* metric. A run with the same storage and name resumes, so an interrupted
cross-validation restarts where it stopped.

**Parallel folds.** ``parallel=1`` (default) trains the folds one after another in this process.
``parallel=N`` keeps up to ``N`` folds in flight, each a Ray task that calls ``train`` with its
sub-config (``train``'s ``ensure_ray`` is a no-op inside Ray, so the fold's trainer joins the same
cluster). The task itself reserves no CPU (``num_cpus=0``): it only drives; its Ray Train workers
reserve theirs, so folds queue on the cluster's resources instead of deadlocking behind drivers.

**The table** (:class:`CVTable`): one row per (method, fold) with the test metrics, and per method
the mean ± sample standard deviation (``ddof=1``; 0 for a single fold) of each metric over folds.
NaN folds (e.g. AUC with a class absent from a small test fold) are left out of the mean, and the
count of folds used is reported.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cliplung.config import Config, ConfigError, apply_overrides, config_from_dict
from cliplung.data.store import NoduleStore
from cliplung.evaluate.evaluate import evaluate
from cliplung.evaluate.splits import SplitLeakError, check_split_isolation
from cliplung.runs import SPLITS_FILE, Run

__all__ = ["METHODS", "CVTable", "compare", "cross_validate", "fold_config", "run_fold"]

METHODS = ("ce", "coop", "cocoop", "cliplung")
SUMMARY_METRICS = ("accuracy", "macro_f1", "auc", "ece")
"""Headline metrics of the table and the bar chart (per-class F1 columns are added)."""


@dataclasses.dataclass
class CVTable:
    """Per-fold test metrics of one or more methods, and their mean ± std over folds."""

    rows: list[dict[str, Any]]
    """One dict per (method, fold): ``method``, ``fold``, ``run``, ``checkpoint``, ``epoch``, metrics."""
    metrics: tuple[str, ...]

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    def summary(self) -> dict[str, dict[str, tuple[float, float, int]]]:
        """``{method: {metric: (mean, std, folds used)}}``; NaN folds are left out."""
        out: dict[str, dict[str, tuple[float, float, int]]] = {}
        for method in self.methods:
            out[method] = {}
            for metric in self.metrics:
                values = np.array([r.get(metric) for r in self.rows if r["method"] == method], dtype=float)
                values = values[np.isfinite(values)]
                if values.size == 0:
                    out[method][metric] = (math.nan, math.nan, 0)
                    continue
                std = float(values.std(ddof=1)) if values.size > 1 else 0.0
                out[method][metric] = (float(values.mean()), std, int(values.size))
        return out

    def to_markdown(self) -> str:
        """Mean ± std per method (rows) and metric (columns)."""
        folds = sorted({r["fold"] for r in self.rows})
        lines = [
            f"Test metrics over folds {', '.join(map(str, folds))}: mean ± std (sample, over folds).",
            "",
            "| method | " + " | ".join(self.metrics) + " |",
            "|---|" + "---|" * len(self.metrics),
        ]
        for method, stats in self.summary().items():
            cells = []
            for metric in self.metrics:
                mean, std, used = stats[metric]
                cell = "n/a" if used == 0 else f"{mean:.3f} ± {std:.3f}"
                if 0 < used < len(folds):
                    cell += f" ({used} folds)"
                cells.append(cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path, prefix: str = "cv", *, chart: bool = False) -> dict[str, Path]:
        """``<prefix>_folds.csv``, ``<prefix>_summary.csv``, ``<prefix>_summary.md`` (and with
        ``chart`` a ``<prefix>_summary.png`` bar chart) in ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "folds": out / f"{prefix}_folds.csv",
            "summary": out / f"{prefix}_summary.csv",
            "markdown": out / f"{prefix}_summary.md",
        }
        keys = ["method", "fold", "run", "checkpoint", "epoch", *self.metrics]
        with paths["folds"].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: _cell(row.get(k)) for k in keys})
        with paths["summary"].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["method", "metric", "mean", "std", "folds"])
            for method, stats in self.summary().items():
                for metric, (mean, std, used) in stats.items():
                    writer.writerow([method, metric, _cell(mean), _cell(std), used])
        paths["markdown"].write_text(self.to_markdown())
        if chart:
            from cliplung.evaluate.report import metric_bars_figure

            summary = {m: {k: (v[0], v[1]) for k, v in s.items()} for m, s in self.summary().items()}
            paths["chart"] = out / f"{prefix}_summary.png"
            paths["chart"].write_bytes(metric_bars_figure(summary, SUMMARY_METRICS))
        return paths


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6f}"
    return "" if value is None else value


def fold_config(config: Config, fold: int, method: str | None = None, *, tag_method: bool = False) -> Config:
    """The training config of fold ``fold`` (and ``method``): ``data.test_fold``, run name."""
    method = method or config.model.method
    name = f"{config.name}-{method}-fold{fold}" if tag_method else f"{config.name}-fold{fold}"
    return apply_overrides(config, [f"data.test_fold={fold}", f"model.method={method}", f"name={name}"])


def _train(config: Config, address: str | None):
    """:func:`cliplung.train.trainer.train`, imported on first use (it pulls in DeepSpeed)."""
    from cliplung.train.trainer import train

    return train(config, address=address)


def _read_splits(config: Config) -> dict[str, Any]:
    run = Run.of(config)
    splits = run.read_splits()
    if splits is None:
        raise SplitLeakError(f"{run.path(SPLITS_FILE)}: the run's split record is missing")
    return splits


def run_fold(
    config_dict: dict[str, Any],
    fold: int,
    method: str | None,
    out_dir: str,
    address: str | None,
    tag_method: bool,
) -> dict[str, Any]:
    """Train fold ``fold`` of ``method``, prove its test fold was never trained on, evaluate it.

    Takes the config as a dict so it can run as a Ray task. Returns the table row.
    """
    config = fold_config(config_from_dict(config_dict), fold, method, tag_method=tag_method)
    _train(config, address)
    store = NoduleStore.open(config.data.store, endpoint=config.storage.endpoint)
    isolation = check_split_isolation(_read_splits(config), store, fold)
    metrics = evaluate(
        config.name,
        store,
        storage=config.storage.path,
        endpoint=config.storage.endpoint,
        out_dir=Path(out_dir) / config.name,
    )
    row: dict[str, Any] = {
        "method": config.model.method,
        "fold": fold,
        "run": config.name,
        "checkpoint": metrics["checkpoint"],
        "epoch": (metrics.get("selection") or {}).get("epoch"),
        "isolation": isolation,
        "n": metrics["n"],
    }
    for key in SUMMARY_METRICS:
        value = metrics.get(key)
        row[key] = math.nan if value is None else float(value)
    for name, stats in metrics["per_class"].items():
        row[f"f1_{name}"] = float(stats["f1"])
    return row


def _fold_list(config: Config, folds: int | Sequence[int]) -> list[int]:
    store = NoduleStore.open(config.data.store, endpoint=config.storage.endpoint)
    fold_values = np.asarray(store.read_rows(0, store.num_nodules, fields=("fold",))["fold"])
    n_folds = int(store.attrs.get("folds") or (int(fold_values.max()) + 1 if fold_values.size else 0))
    wanted = list(range(folds)) if isinstance(folds, int) else [int(f) for f in folds]
    if not wanted:
        raise ConfigError("--folds: no folds to run")
    bad = [f for f in wanted if not 0 <= f < n_folds]
    if bad:
        raise ConfigError(f"--folds: store {store.path} has folds 0..{n_folds - 1}, asked for {bad}")
    empty = [f for f in wanted if not (fold_values == f).any()]
    if empty:
        raise ConfigError(f"--folds: fold(s) {empty} of store {store.path} hold no nodules")
    return wanted


def cross_validate(
    config: Config,
    folds: int | Sequence[int],
    *,
    methods: Sequence[str] | None = None,
    address: str | None = None,
    out_dir: str | Path | None = None,
    parallel: int = 1,
) -> CVTable:
    """Train and evaluate every fold (``folds``: a count, 0..n-1, or the fold indices) of every
    method (default: ``config.model.method``). Evaluation reports go to ``out_dir`` (default
    ``reports/<name>``) one directory per run, and the table files next to them."""
    methods = list(methods or [config.model.method])
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method(s) {unknown}; choose from {list(METHODS)}")
    fold_ids = _fold_list(config, folds)
    out = Path(out_dir) if out_dir is not None else Path("reports") / config.name
    tag_method = methods != [config.model.method] or len(methods) > 1
    jobs = [(m, k) for m in methods for k in fold_ids]
    data = config.to_dict()
    if parallel <= 1:
        rows = [run_fold(data, k, m, str(out), address, tag_method) for m, k in jobs]
    else:
        rows = _run_parallel(config, jobs, str(out), address, tag_method, parallel)
    per_class = dict.fromkeys(k for r in rows for k in r if k.startswith("f1_"))  # in class order
    metric_names = (*SUMMARY_METRICS, *per_class)
    table = CVTable(rows=rows, metrics=metric_names)
    table.write(out, "cv", chart=len(methods) > 1)
    return table


def _run_parallel(
    config: Config,
    jobs: list[tuple[str, int]],
    out: str,
    address: str | None,
    tag_method: bool,
    parallel: int,
) -> list[dict[str, Any]]:
    import ray

    from cliplung.cluster import ensure_ray

    ensure_ray(address, num_cpus=os.cpu_count() or 1)
    task = ray.remote(num_cpus=0, max_retries=0)(run_fold)
    data = config.to_dict()
    pending: dict[Any, int] = {}
    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    queue = list(enumerate(jobs))
    while queue or pending:
        while queue and len(pending) < parallel:
            i, (method, fold) = queue.pop(0)
            pending[task.remote(data, fold, method, out, None, tag_method)] = i
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            rows[pending.pop(ref)] = ray.get(ref)
    return [r for r in rows if r is not None]


def compare(
    config: Config,
    folds: int | Sequence[int],
    methods: Sequence[str] = METHODS,
    *,
    out_dir: str | Path,
    address: str | None = None,
    parallel: int = 1,
) -> CVTable:
    """:func:`cross_validate` of several methods on the same folds; writes ``compare_summary.csv``,
    ``compare_summary.md`` (mean ± std per metric), ``compare_folds.csv`` and the bar chart
    ``compare_summary.png`` to ``out_dir``."""
    table = cross_validate(
        config, folds, methods=methods, address=address, out_dir=out_dir, parallel=parallel
    )
    table.write(out_dir, "compare", chart=True)
    return table
