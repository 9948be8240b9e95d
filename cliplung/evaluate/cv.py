"""``cliplung cv`` and ``cliplung compare``: patient-level k-fold cross-validation.

::

    cliplung cv --config debug --data stores/phantom --folds 5 --storage runs --name debug
    cliplung compare --config debug --data stores/phantom --folds 5 --storage runs --name cmp \\
        --setting 3class --methods all --early-stopping 5 --epochs 40 --parallel 3 --out reports/cmp

**Methods** (:data:`VARIANTS`, ``--methods``): the four of ``model.method`` (``ce``, ``coop``,
``cocoop``, ``cliplung``) and CLIP-Lung's ablations: ``cliplung-no-ic``, ``cliplung-no-ca``,
``cliplung-no-ia`` (λ_IC, λ_CA or λ_IA set to 0) and ``cliplung-rating`` (attribute prompts that
state the rating instead of naming the attribute). ``cliplung`` is the config's CLIP-Lung (in both
presets the published form: name prompts, λ_IC 1, λ_CA 0.5, λ_IA 1) and each ablation changes one
thing from it. ``--methods all`` runs all eight.

**One fold** ``k`` of one method: the training config with ``data.test_fold=k`` and the method's
overrides, run name ``<name>-fold<k>`` (``compare``: ``<name>-<method>-fold<k>``), trained by
:func:`cliplung.train.trainer.train`, which holds out fold ``k`` and takes its validation patients
from the other folds. The run's recorded ``splits.json`` is then checked against the store's
``fold`` array (:func:`~cliplung.evaluate.splits.check_split_isolation`: no fold-``k`` nodule or
patient among the training or validation rows, else :class:`SplitLeakError`), and fold ``k`` is
scored by :func:`~cliplung.evaluate.evaluate.evaluate` with the run's best checkpoint by its
*validation* metric. A run with the same storage and name resumes, so an interrupted
cross-validation restarts where it stopped; a run that stopped early is complete.

**Same budget, same rule.** Every method gets the same config but its own overrides: the same
folds, validation patients, epochs, early-stopping rule (``train.early_stopping``, on the
selection metric ``train.checkpoint_metric``) and checkpoint selection. Nothing is tuned per
method.

**Parallel folds.** ``parallel=1`` (default) trains the runs one after another in this process.
``parallel=N`` keeps up to ``N`` runs in flight, each a Ray task that calls ``train`` with its
sub-config (``train``'s ``ensure_ray`` is a no-op inside Ray, so the run's trainer joins the same
cluster). The task itself reserves no CPU (``num_cpus=0``): it only drives; its Ray Train workers
reserve theirs, so runs queue on the cluster's resources instead of deadlocking behind drivers.
With 1-worker runs (``train.workers=1``) several runs share one machine. Runs are started
text-tower methods first and ``ce`` (the cheapest) last, so the last runs in flight are short.

**The table** (:class:`CVTable`): one row per (method, fold) with the test metrics, the epochs
trained (and whether early stopping ended the run) and the selected epoch; per method the mean ±
sample standard deviation (``ddof=1``; 0 for a single fold) of each metric over folds (NaN folds,
e.g. AUC with a class absent from a small test fold, are left out and the count of folds used is
shown); per-class recall and F1; for each method against ``ce`` the paired per-fold difference of
macro-F1, AUC and the unsure-class F1 with a paired bootstrap confidence interval and the exact
Wilcoxon signed-rank p-value (:mod:`cliplung.evaluate.stats` says which is the primary number and
why); and the learning curves (validation metric by epoch, mean over folds).
"""

from __future__ import annotations

import csv
import dataclasses
import json
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
from cliplung.labels import describe_rule, setting_name
from cliplung.runs import SPLITS_FILE, Run

__all__ = [
    "BASELINE",
    "METHODS",
    "PAIRED_METRICS",
    "VARIANTS",
    "CVTable",
    "compare",
    "cross_validate",
    "fold_config",
    "resolve_methods",
    "run_fold",
]

VARIANTS: dict[str, tuple[str, ...]] = {
    "ce": ("model.method=ce",),
    "coop": ("model.method=coop",),
    "cocoop": ("model.method=cocoop",),
    "cliplung": ("model.method=cliplung",),
    "cliplung-no-ic": ("model.method=cliplung", "model.lambda_ic=0"),
    "cliplung-no-ca": ("model.method=cliplung", "model.lambda_ca=0"),
    "cliplung-no-ia": ("model.method=cliplung", "model.lambda_ia=0"),
    "cliplung-rating": ("model.method=cliplung", "model.attribute_prompts=rating"),
}
"""``compare``'s methods: name -> the config overrides that make it. Each ablation changes one
thing from the config's CLIP-Lung (``cliplung``)."""
METHODS = ("ce", "coop", "cocoop", "cliplung")
"""The default of ``--methods``: the four ``model.method`` values."""
BASELINE = "ce"
SUMMARY_METRICS = ("accuracy", "macro_f1", "auc", "ece")
"""Headline metrics of the table and the bar chart (per-class F1 and recall columns are added)."""
PAIRED_METRICS = ("macro_f1", "auc", "f1_unsure")
"""Metrics compared with ``ce`` fold by fold (``f1_unsure`` only when the test task has it)."""
CURVE_METRIC = "val/macro_f1"


def resolve_methods(text: str | Sequence[str]) -> list[str]:
    """``--methods``: comma-separated names of :data:`VARIANTS`, or ``all``."""
    names = [m.strip() for m in text.split(",")] if isinstance(text, str) else [str(m) for m in text]
    names = [m for m in names if m]
    if names == ["all"]:
        return list(VARIANTS)
    if not names:
        raise ConfigError("--methods: name at least one method")
    unknown = [m for m in names if m not in VARIANTS]
    if unknown:
        raise ConfigError(f"--methods: unknown method(s) {unknown}; choose from {[*VARIANTS, 'all']}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--methods: a method is named twice in {names}")
    return names


def _variant_of(config: Config) -> str:
    """The variant a plain config is (``cv`` without ``--methods``): its ``model.method``."""
    return config.model.method


@dataclasses.dataclass
class CVTable:
    """Per-fold test metrics of one or more methods, and their statistics over folds."""

    rows: list[dict[str, Any]]
    """One dict per (method, fold): ``method``, ``fold``, ``run``, ``checkpoint``, ``epoch`` (the
    selected one), ``epochs_trained``, ``stopped_early``, metrics; ``curve`` (the run's validation
    history) and ``predictions`` (its test predictions) are kept for the statistics, not the CSV."""
    metrics: tuple[str, ...]
    setting: str = ""
    """What the rows were trained and tested on (the label rule, training and test tasks)."""
    class_names: tuple[str, ...] = ()
    """Classes of the test task."""

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    @property
    def folds(self) -> list[int]:
        return sorted({int(r["fold"]) for r in self.rows})

    def _values(self, method: str, key: str) -> np.ndarray:
        return np.array(
            [np.nan if r.get(key) is None else r.get(key) for r in self.rows if r["method"] == method],
            dtype=float,
        )

    def summary(self) -> dict[str, dict[str, tuple[float, float, int]]]:
        """``{method: {metric: (mean, std, folds used)}}``; NaN folds are left out."""
        out: dict[str, dict[str, tuple[float, float, int]]] = {}
        for method in self.methods:
            out[method] = {}
            for metric in (*self.metrics, "epochs_trained"):
                values = self._values(method, metric)
                values = values[np.isfinite(values)]
                if values.size == 0:
                    out[method][metric] = (math.nan, math.nan, 0)
                    continue
                std = float(values.std(ddof=1)) if values.size > 1 else 0.0
                out[method][metric] = (float(values.mean()), std, int(values.size))
        return out

    # ---------------------------------------------------------------- paired statistics

    def paired(self, baseline: str = BASELINE, metrics: Sequence[str] = PAIRED_METRICS):
        """``{method: [PairedResult, ...]}`` of every method against ``baseline`` (empty when the
        baseline did not run or no row kept its predictions)."""
        from cliplung.evaluate.stats import FoldPredictions, paired_comparison

        wanted = [m for m in metrics if m in self.metrics]
        if baseline not in self.methods or not wanted:
            return {}

        def predictions(method: str) -> dict[int, FoldPredictions]:
            out = {}
            for r in self.rows:
                p = r.get("predictions")
                if r["method"] == method and p:
                    out[int(r["fold"])] = FoldPredictions(
                        rows=np.asarray(p["rows"]),
                        labels=np.asarray(p["labels"]),
                        patients=np.asarray(p["patients"]),
                        probs=np.asarray(p["probs"], dtype=np.float64),
                    )
            return out

        base = predictions(baseline)
        if not base:
            return {}
        return {
            method: paired_comparison(predictions(method), base, wanted, self.class_names)
            for method in self.methods
            if method != baseline and predictions(method)
        }

    # ---------------------------------------------------------------- learning curves

    def curves(self, metric: str = CURVE_METRIC) -> dict[str, list[list[float | None]]]:
        """``{method: [per-fold values by epoch]}`` of the validation history runs recorded."""
        out: dict[str, list[list[float | None]]] = {}
        for r in self.rows:
            history = r.get("curve") or {}
            if metric in history:
                out.setdefault(r["method"], []).append(list(history[metric]))
        return out

    # ---------------------------------------------------------------- text

    def to_markdown(self) -> str:
        """The tables: headline metrics, per-class F1 and recall, paired differences vs ``ce``,
        epochs per fold."""
        folds = self.folds
        summary = self.summary()
        lines = []
        if self.setting:
            lines += [self.setting, ""]
        lines += [
            f"Test metrics over folds {', '.join(map(str, folds))}: mean ± std (sample, over folds); "
            "epochs: epochs trained (early stopping), mean ± std.",
            "",
        ]
        headline = [m for m in self.metrics if not m.startswith(("f1_", "recall_"))]
        lines += _markdown_table(summary, folds, [*headline, "epochs_trained"], {"epochs_trained": "epochs"})
        per_class = [m for m in self.metrics if m.startswith(("f1_", "recall_"))]
        if per_class:
            lines += ["", "Per class (test): F1 and recall, mean ± std over folds.", ""]
            lines += _markdown_table(summary, folds, per_class, {})
        paired = self.paired()
        if paired:
            from cliplung.evaluate.stats import BOOTSTRAP_SAMPLES

            names = [r.metric for r in next(iter(paired.values()))]
            lines += [
                "",
                f"Paired difference, method − {BASELINE}, over the same folds: mean over folds "
                f"[95 % paired bootstrap CI, {BOOTSTRAP_SAMPLES} resamples of the test patients within "
                f"each fold]; wins: folds better than {BASELINE}; p: exact Wilcoxon signed-rank over the "
                f"per-fold differences (two-sided; it cannot go below {2 / 2 ** len(folds):.4g} at "
                f"{len(folds)} folds).",
                "",
                "| method | " + " | ".join(f"Δ {n}" for n in names) + " |",
                "|---|" + "---|" * len(names),
            ]
            for method, results in paired.items():
                cells = [
                    "n/a"
                    if math.isnan(r.mean)
                    else f"{r.mean:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}], "
                    f"wins {r.wins}/{sum(math.isfinite(d) for d in r.differences)}, p={r.wilcoxon_p:.3g}"
                    for r in results
                ]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines += ["", "Per-fold differences (folds " + ", ".join(map(str, folds)) + "):", ""]
            lines += [
                "| method | " + " | ".join(f"Δ {n}" for n in names) + " |",
                "|---|" + "---|" * len(names),
            ]
            for method, results in paired.items():
                cells = [
                    " ".join("n/a" if math.isnan(d) else f"{d:+.3f}" for d in r.differences) for r in results
                ]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Epochs trained per fold (* stopped early; the selected, best-on-validation epoch in "
            "parentheses, counted from 1).",
            "",
            "| method | " + " | ".join(f"fold {k}" for k in folds) + " |",
            "|---|" + "---|" * len(folds),
        ]
        for method in self.methods:
            by_fold = {int(r["fold"]): r for r in self.rows if r["method"] == method}
            cells = []
            for k in folds:
                r = by_fold.get(k)
                if r is None or r.get("epochs_trained") is None:
                    cells.append("n/a")
                    continue
                best = "?" if r.get("epoch") is None else int(r["epoch"]) + 1
                cells.append(f"{r['epochs_trained']}{'*' if r.get('stopped_early') else ''} ({best})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    # ---------------------------------------------------------------- files

    def write(self, out_dir: str | Path, prefix: str = "cv", *, chart: bool = False) -> dict[str, Path]:
        """``<prefix>_folds.csv``, ``<prefix>_summary.csv``, ``<prefix>_summary.md``,
        ``<prefix>_paired.csv`` and ``<prefix>_curves.json`` in ``out_dir``; with ``chart`` also
        ``<prefix>_summary.png`` (bars), ``<prefix>_paired.png`` (differences vs ``ce``) and
        ``<prefix>_curves.png`` (learning curves)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "folds": out / f"{prefix}_folds.csv",
            "summary": out / f"{prefix}_summary.csv",
            "markdown": out / f"{prefix}_summary.md",
            "paired": out / f"{prefix}_paired.csv",
            "curves_data": out / f"{prefix}_curves.json",
        }
        keys = [
            "method",
            "fold",
            "run",
            "checkpoint",
            "epoch",
            "epochs_trained",
            "stopped_early",
            "n",
            *self.metrics,
        ]
        with paths["folds"].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: _cell(row.get(k)) for k in keys})
        summary = self.summary()
        with paths["summary"].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["method", "metric", "mean", "std", "folds"])
            for method, stats in summary.items():
                for metric, (mean, std, used) in stats.items():
                    writer.writerow([method, metric, _cell(mean), _cell(std), used])
        paired = self.paired()
        with paths["paired"].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                [
                    "method",
                    "baseline",
                    "metric",
                    "mean",
                    "ci_low",
                    "ci_high",
                    "wilcoxon_p",
                    "wins",
                    "folds",
                    "differences",
                ]
            )
            for method, results in paired.items():
                for r in results:
                    writer.writerow(
                        [
                            method,
                            BASELINE,
                            r.metric,
                            _cell(r.mean),
                            _cell(r.ci_low),
                            _cell(r.ci_high),
                            _cell(r.wilcoxon_p),
                            r.wins,
                            " ".join(map(str, r.folds)),
                            " ".join(_cell(d) or "nan" for d in r.differences),
                        ]
                    )
        curves = self.curves()
        paths["curves_data"].write_text(json.dumps({"metric": CURVE_METRIC, "curves": curves}) + "\n")
        paths["markdown"].write_text(self.to_markdown())
        if chart:
            from cliplung.evaluate.report import learning_curves_figure, metric_bars_figure, paired_figure

            bars = {m: {k: (v[0], v[1]) for k, v in s.items()} for m, s in summary.items()}
            paths["chart"] = out / f"{prefix}_summary.png"
            paths["chart"].write_bytes(metric_bars_figure(bars, SUMMARY_METRICS))
            if paired:
                paths["paired_chart"] = out / f"{prefix}_paired.png"
                paths["paired_chart"].write_bytes(paired_figure(paired, BASELINE))
            if curves:
                stops = {
                    m: [r.get("epochs_trained") for r in self.rows if r["method"] == m and r.get("curve")]
                    for m in curves
                }
                paths["curves"] = out / f"{prefix}_curves.png"
                paths["curves"].write_bytes(learning_curves_figure(curves, CURVE_METRIC, stops))
        return paths


def _markdown_table(summary, folds, columns: Sequence[str], titles: dict[str, str]) -> list[str]:
    lines = [
        "| method | " + " | ".join(titles.get(c, c) for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for method, stats in summary.items():
        cells = []
        for metric in columns:
            mean, std, used = stats.get(metric, (math.nan, math.nan, 0))
            digits = 1 if metric == "epochs_trained" else 3
            cell = "n/a" if used == 0 else f"{mean:.{digits}f} ± {std:.{digits}f}"
            if 0 < used < len(folds):
                cell += f" ({used} folds)"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6f}"
    return "" if value is None else value


def describe_setting(config: Config) -> str:
    """One line naming the dataset setting of a config (see :mod:`cliplung.labels`)."""
    data = config.data
    name = setting_name(data.unsure_range, data.task, data.scored_task)
    head = f"Setting `{name}`" if name else "Setting (unnamed)"
    return (
        f"{head}: {describe_rule(data.unsure_range)}; trained on {data.task}, tested on {data.scored_task}"
        + (
            " (unsure test nodules dropped, probabilities conditioned on not unsure)"
            if data.scored_task != data.task
            else ""
        )
        + "."
    )


def fold_config(config: Config, fold: int, method: str | None = None, *, tag_method: bool = False) -> Config:
    """The training config of fold ``fold`` and method ``method`` (a :data:`VARIANTS` name; default
    the config's ``model.method``): ``data.test_fold``, the method's overrides, the run name."""
    method = method or _variant_of(config)
    if method not in VARIANTS:
        raise ConfigError(f"--methods: unknown method {method!r}; choose from {list(VARIANTS)}")
    name = f"{config.name}-{method}-fold{fold}" if tag_method else f"{config.name}-fold{fold}"
    return apply_overrides(config, [f"data.test_fold={fold}", *VARIANTS[method], f"name={name}"])


def _train(config: Config, address: str | None, shared_data=None):
    """:func:`cliplung.train.trainer.train`, imported on first use (it pulls in DeepSpeed)."""
    from cliplung.train.trainer import train

    return train(config, address=address, shared_data=shared_data)


def _shared_data(config: Config, fold: int, method: str, address: str | None):
    """Fold ``fold``'s training and validation data, read once for all its methods
    (:mod:`cliplung.data.shared`); starts or joins Ray. The store is validated first, so bad input
    fails before any run."""
    from cliplung.cluster import ensure_ray
    from cliplung.data.ingest import open_training_store
    from cliplung.data.shared import SharedSplitData

    cfg = fold_config(config, fold, method, tag_method=True)
    store, splits = open_training_store(cfg)
    ensure_ray(address, num_cpus=os.cpu_count() or 1)
    return SharedSplitData(cfg, store, splits)


def _read_splits(config: Config) -> dict[str, Any]:
    run = Run.of(config)
    splits = run.read_splits()
    if splits is None:
        raise SplitLeakError(f"{run.path(SPLITS_FILE)}: the run's split record is missing")
    return splits


def _training_record(config: Config) -> dict[str, Any]:
    """Epochs trained, whether early stopping ended the run, and its validation history."""
    from cliplung.train.early_stopping import STATE_KEY, read_train_state

    run = Run.of(config)
    latest = run.latest_checkpoint()
    if latest is None:
        return {"epochs_trained": None, "stopped_early": None, "curve": None}
    record = (read_train_state(latest.location, config.storage.endpoint) or {}).get(STATE_KEY) or {}
    return {
        "epochs_trained": None if latest.epoch is None else latest.epoch + 1,
        "stopped_early": bool(record.get("stopped", False)),
        "curve": record.get("history"),
    }


def _read_predictions(path: Path, class_names: Sequence[str]) -> dict[str, list]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    index = {n: i for i, n in enumerate(class_names)}
    return {
        "rows": [int(r["row"]) for r in rows],
        "labels": [index[r["label"]] for r in rows],
        "patients": [r["patient_id"] for r in rows],
        "probs": [[float(r[f"p_{n}"]) for n in class_names] for r in rows],
    }


def run_fold(
    config_dict: dict[str, Any],
    fold: int,
    method: str | None,
    out_dir: str,
    address: str | None,
    tag_method: bool,
    shared_data=None,
) -> dict[str, Any]:
    """Train fold ``fold`` of ``method``, prove its test fold was never trained on, evaluate it.

    Takes the config as a dict so it can run as a Ray task. ``shared_data``: the fold's data read
    once (:func:`_shared_data`), or None for the run to read its own. Returns the table row.
    """
    base = config_from_dict(config_dict)
    method = method or _variant_of(base)
    config = fold_config(base, fold, method, tag_method=tag_method)
    _train(config, address, shared_data)
    store = NoduleStore.open(config.data.store, endpoint=config.storage.endpoint)
    isolation = check_split_isolation(_read_splits(config), store, fold)
    report_dir = Path(out_dir) / config.name
    metrics = evaluate(
        config.name,
        store,
        storage=config.storage.path,
        endpoint=config.storage.endpoint,
        out_dir=report_dir,
    )
    row: dict[str, Any] = {
        "method": method,
        "fold": fold,
        "run": config.name,
        "checkpoint": metrics["checkpoint"],
        "epoch": (metrics.get("selection") or {}).get("epoch"),
        **_training_record(config),
        "isolation": isolation,
        "n": metrics["n"],
    }
    for key in SUMMARY_METRICS:
        value = metrics.get(key)
        row[key] = math.nan if value is None else float(value)
    for name, stats in metrics["per_class"].items():
        row[f"f1_{name}"] = float(stats["f1"])
    for name, stats in metrics["per_class"].items():
        row[f"recall_{name}"] = math.nan if stats.get("support", 0) == 0 else float(stats["recall"])
    row["predictions"] = _read_predictions(report_dir / "predictions.csv", metrics["class_names"])
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


def _launch_order(jobs: list[tuple[str, int]]) -> list[int]:
    """Job indices in the order parallel runs start: text-tower methods first, ``ce`` last (the
    longest runs start first, so the machine is not left with one long run at the end)."""
    return sorted(range(len(jobs)), key=lambda i: (jobs[i][0] == "ce", i))


def cross_validate(
    config: Config,
    folds: int | Sequence[int],
    *,
    methods: Sequence[str] | None = None,
    address: str | None = None,
    out_dir: str | Path | None = None,
    parallel: int = 1,
    prefix: str = "cv",
    share_data: bool = True,
) -> CVTable:
    """Train and evaluate every fold (``folds``: a count, 0..n-1, or the fold indices) of every
    method (:data:`VARIANTS` names; default: ``config.model.method``). Evaluation reports go to
    ``out_dir`` (default ``reports/<name>``) one directory per run, and the table files
    (``<prefix>_summary.md`` and the rest, see :meth:`CVTable.write`) next to them. With
    ``share_data`` every fold's data is read once for all its methods."""
    methods = resolve_methods(methods) if methods else [_variant_of(config)]
    fold_ids = _fold_list(config, folds)
    out = Path(out_dir) if out_dir is not None else Path("reports") / config.name
    tag_method = methods != [_variant_of(config)] or len(methods) > 1
    jobs = [(m, k) for m in methods for k in fold_ids]
    data = config.to_dict()
    shared: dict[int, Any] = {}

    def fold_data(fold: int, method: str):
        if share_data and len(methods) > 1 and fold not in shared:
            shared[fold] = _shared_data(config, fold, method, address)
        return shared.get(fold)

    if parallel <= 1:
        rows = [run_fold(data, k, m, str(out), address, tag_method, fold_data(k, m)) for m, k in jobs]
    else:
        rows = _run_parallel(config, jobs, str(out), address, tag_method, parallel, fold_data)
    shared.clear()
    per_class = dict.fromkeys(k for r in rows for k in r if k.startswith(("f1_", "recall_")))
    metric_names = (*SUMMARY_METRICS, *sorted(per_class, key=lambda k: not k.startswith("f1_")))
    table = CVTable(
        rows=rows,
        metrics=metric_names,
        setting=describe_setting(config),
        class_names=config.data.test_class_names,
    )
    table.write(out, prefix, chart=len(methods) > 1 or prefix == "compare")
    return table


def _run_parallel(
    config: Config,
    jobs: list[tuple[str, int]],
    out: str,
    address: str | None,
    tag_method: bool,
    parallel: int,
    fold_data,
) -> list[dict[str, Any]]:
    import ray

    from cliplung.cluster import ensure_ray

    ensure_ray(address, num_cpus=os.cpu_count() or 1)
    task = ray.remote(num_cpus=0, max_retries=0)(run_fold)
    data = ray.put(config.to_dict())
    pending: dict[Any, int] = {}
    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    queue = _launch_order(jobs)
    while queue or pending:
        while queue and len(pending) < parallel:
            i = queue.pop(0)
            method, fold = jobs[i]
            pending[task.remote(data, fold, method, out, None, tag_method, fold_data(fold, method))] = i
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
    """:func:`cross_validate` of several methods on the same folds; writes ``compare_summary.md``
    (the tables), ``compare_summary.csv``, ``compare_folds.csv``, ``compare_paired.csv`` and the
    figures ``compare_summary.png``, ``compare_paired.png``, ``compare_curves.png`` to ``out_dir``."""
    return cross_validate(
        config, folds, methods=methods, address=address, out_dir=out_dir, parallel=parallel, prefix="compare"
    )
