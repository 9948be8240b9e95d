"""What a finished search leaves behind: ``trials.csv``, ``best.yaml`` and the study's plots.

Written into the search directory (local or ``s3://``) by :func:`summarize` once Tune has no
trial left to run: one row per Tune trial (its Optuna state and number, epochs, the last and the
best value of the metric, the searched parameters, its newest checkpoint as the run layer finds
it), the best completed trial's config as a ready-to-train ``best.yaml``, and Optuna's
optimisation-history and parameter-importance plots.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from cliplung.config import Config, dump_config
from cliplung.runs import Run
from cliplung.tune.space import SearchPlan, apply_params
from cliplung.tune.study import EPOCHS_DONE, TRIAL_ID_ATTR, public_url, reconcile_study

__all__ = ["DASHBOARD_PORT", "SUMMARY_METRICS", "TuneSummary", "summarize", "trial_rows"]

DASHBOARD_PORT = 8081
"""Port suggested for optuna-dashboard (Ray's dashboard has 8265)."""
SUMMARY_METRICS = ("val/macro_f1", "val/accuracy", "val/auc", "train/loss")


@dataclass
class TuneSummary:
    """What a finished (or resumed and finished) search left behind."""

    name: str
    run_dir: str
    study_db: str
    metric: str
    mode: str
    trials: list[dict] = field(default_factory=list)
    best: dict | None = None
    best_config: str | None = None
    trials_csv: str | None = None
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.trials:
            out[row["state"]] = out.get(row["state"], 0) + 1
        return out

    def format(self) -> str:
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(self.counts.items()))
        lines = [f"search {self.name}: {len(self.trials)} trials ({counts})"]
        if self.best:
            params = ", ".join(f"{k}={_fmt(v)}" for k, v in self.best["params"].items())
            lines.append(
                f"  best: trial {self.best['trial_id']} {self.metric}={self.best['value']:.4f} ({params})"
            )
        lines += [
            f"  search directory: {self.run_dir}",
            f"  trials table:     {self.trials_csv}",
            f"  best config:      {self.best_config}"
            + ("  (cliplung train --config it)" if self.best_config else ""),
            f"  plots:            {', '.join(self.plots) or 'none'}",
            f"  optuna study:     {self.study_db}",
            f"  watch the study:  optuna-dashboard {self.study_db} --host 127.0.0.1 --port {DASHBOARD_PORT}"
            + ("  (password: PGPASSWORD or ~/.pgpass)" if self.study_db.startswith("postgresql") else ""),
            f"  curves:           tensorboard --logdir {self.run_dir}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_rows(
    results, study: optuna.Study, plan: SearchPlan, metric: str, mode: str, trial_runs: str
) -> list[dict]:
    """One row per Tune trial: its Optuna state and number, epochs, last and best metric, params,
    and its newest checkpoint (``trial_runs``: the storage of the trials' training runs)."""
    by_ray_id = {t.user_attrs.get(TRIAL_ID_ATTR): t for t in study.get_trials(deepcopy=False)}
    rows = []
    for result in results:
        trial_id = os.path.basename(str(result.path).rstrip("/"))
        last = result.metrics or {}
        ot = by_ray_id.get(trial_id)
        intermediate = list(ot.intermediate_values.values()) if ot else []
        best_seen = (max if mode == "max" else min)(intermediate) if intermediate else None
        state = ot.state.name if ot else ("FAIL" if result.error else "UNKNOWN")
        row = {
            "trial_id": trial_id,
            "optuna_trial": ot.number if ot else None,
            "state": "FAIL" if result.error else state,
            EPOCHS_DONE: last.get(EPOCHS_DONE),
            metric: last.get(metric),
            f"best_{metric}": best_seen,
        }
        row.update({k: last.get(k) for k in SUMMARY_METRICS if k != metric})
        row["time_total_s"] = last.get("time_total_s")
        params = ot.params if ot else (result.config or {})
        row.update({k: params.get(k) for k in plan.distributions})
        latest = Run(trial_runs, trial_id).latest_checkpoint()
        row["checkpoint"] = latest.location if latest else None
        row["error"] = str(result.error).splitlines()[0] if result.error else ""
        rows.append(row)
    rows.sort(key=lambda r: (r["optuna_trial"] is None, r["optuna_trial"] or 0, r["trial_id"]))
    return rows


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def _plots(study: optuna.Study, plan: SearchPlan, seed: int) -> tuple[dict[str, bytes], list[str]]:
    """PNG bytes of the optimisation history and the parameter importances, and notes on what
    could not be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as ovm

    pngs: dict[str, bytes] = {}
    notes: list[str] = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def save(name: str, draw) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            ax = draw()
        fig = ax.figure
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        pngs[name] = buf.getvalue()

    if complete:
        save("optimization_history.png", lambda: ovm.plot_optimization_history(study))
    else:
        notes.append("no completed trial: no optimisation history plot")
    varying = [k for k in plan.distributions if len({t.params.get(k) for t in complete}) > 1]
    if len(complete) >= 2 and varying:
        try:
            save(
                "param_importances.png",
                lambda: ovm.plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed)),
            )
        except Exception as exc:  # e.g. a degenerate set of completed trials
            notes.append(f"parameter importances not drawn: {type(exc).__name__}: {exc}")
    else:
        notes.append(
            f"parameter importances need at least 2 completed trials whose parameters differ "
            f"(have {len(complete)} completed); not drawn"
        )
    return pngs, notes


def summarize(
    config: Config,
    plan: SearchPlan,
    study: optuna.Study,
    study_url: str,
    results,
    search: Run,
    trial_runs: str,
    notes: list[str],
) -> TuneSummary:
    """Reconcile the study with Tune's results and write the summary files into ``search``."""
    tc = config.tune
    notes = notes + reconcile_study(study, results, tc.metric, config.train.epochs)
    rows = trial_rows(results, study, plan, tc.metric, tc.mode, trial_runs)
    summary = TuneSummary(
        name=config.name,
        run_dir=search.location,
        study_db=public_url(study_url),
        metric=tc.metric,
        mode=tc.mode,
        trials=rows,
        notes=notes,
    )
    search.write_text("trials.csv", _csv_text(rows))
    summary.trials_csv = search.path("trials.csv")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        best_config = apply_params(config, {**plan.fixed, **best.params}).replace(name=f"{config.name}-best")
        search.write_text("best.yaml", dump_config(best_config))
        summary.best_config = search.path("best.yaml")
        summary.best = {
            "trial_id": best.user_attrs.get(TRIAL_ID_ATTR),
            "optuna_trial": best.number,
            "value": best.value,
            "params": dict(best.params),
        }
    else:
        summary.notes.append("no trial completed all its epochs: no best.yaml")
    pngs, plot_notes = _plots(study, plan, tc.seed)
    for name, data in pngs.items():
        search.write_bytes(name, data)
        summary.plots.append(search.path(name))
    summary.notes += plot_notes
    errored = [r["trial_id"] for r in rows if r["state"] == "FAIL"]
    if errored:
        summary.notes.append(f"trials that failed: {errored} (their errors are in trials.csv)")
    return summary
