"""Hyperparameter search in which every trial is a whole Ray Train run of the CLIP-Lung trainer.

    cliplung tune --config debug --data stores/phantom --storage runs --name search1 --trials 16
    cliplung tune --config debug --data stores/phantom --storage runs --name search1 --resume

A search is identified by ``(storage.path, name)``. Its directory holds::

    <storage>/<name>/
      config.yaml               the search's full config (resume reads it back)
      optuna.db                 the Optuna study (default; tune.study_db takes any SQLAlchemy URL)
      experiment_state-*.json   Ray Tune's state: trial statuses, searcher and scheduler
      <trial_id>/               Tune's per-trial logs: result.json, progress.csv, TensorBoard events
      runs/<trial_id>/          the trial's Ray Train run: config.yaml, splits.json, epoch_NNNN/
      trials.csv  best.yaml  optimization_history.png  param_importances.png   (the summary)

The parts:

* **Search space** (:func:`search_space`): ``model.n_ctx`` from ``tune.space.n_ctx``,
  ``model.lambda_{ic,ca,ia}`` uniform, ``train.lr`` and ``train.weight_decay`` log-uniform, as
  Optuna distributions keyed by their config field. A range of one value fixes that field.
  Constraints are plain Python checks that run before anything starts: every ``n_ctx`` must
  divide ``model.feature_channels``, something must vary, and ``model.method=ce`` (no prompts, no
  contrastive losses) cannot search prompt length or loss weights.
* **Searcher**: Optuna's TPE sampler seeded with ``tune.seed``, behind Ray's ``OptunaSearch`` and a
  ``ConcurrencyLimiter(tune.max_concurrent)``. The study lives in a relational database (a SQLite
  file by default), so it outlives the driver and ``optuna-dashboard`` can show it while it runs.
  Every Optuna trial carries its Ray trial id as the user attribute ``ray_trial_id``.
* **Scheduler**: with ``tune.asha``, ASHA on ``epochs_done`` (grace period ``tune.grace_period``,
  halving rate ``tune.reduction_factor``, ``max_t = train.epochs``). A trial that ASHA stops is
  told to Optuna as PRUNED, so the reported best configuration is always a fully trained one.
* **Trial** (``_trial_driver``): a small Tune function that builds a ``TorchTrainer`` with
  :func:`cliplung.train.trainer.build_trainer` and calls ``fit()``. It reserves
  ``TRIAL_DRIVER_CPUS`` for itself; the trainer places its own workers (``train.workers`` x
  ``train.cpus_per_worker`` CPUs, ``train.gpus_per_worker`` GPUs each, fractions allowed), so a
  trial can be 2 CPU workers, 4 GPUs, or a quarter of one.
* **Resume** (``resume=True``): ``Tuner.restore(resume_errored=True)``. Finished trials are kept as
  they are; unfinished and errored ones start their Tune function again, and its trainer resumes
  from the newest complete checkpoint of the trial's Train run. The study stays in its database,
  and the searcher's map from Tune trials to Optuna trials is part of Tune's saved state. Tune
  saves that state every ~10 s, so a trial that finished in the last seconds before the driver
  died may come back as unfinished: its Train run is already complete, and the trial re-reports
  its final metrics from the last checkpoint instead of training again. When the search ends the
  study is reconciled with Tune's results (an errored trial that succeeded on resume is recorded
  again as a completed copy; Optuna trials asked by a dead driver are closed as FAIL).
* **Placement groups**: a watchdog frees a stopped trial's worker placement group (see
  :class:`_PlacementGroupWatchdog`), so ASHA stops never leak CPUs or GPUs.

Watching a search: the Ray dashboard (``http://127.0.0.1:8265`` for the embedded Ray) lists the
driver job, the trial actors and each trial's Train run; ``optuna-dashboard <study-db> --host
127.0.0.1 --port 8081`` shows the study; ``tensorboard --logdir <storage>/<name>`` the per-trial
curves (Tune's TensorBoardX logger).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
import ray
import ray.tune
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from cliplung.cluster import ensure_ray
from cliplung.config import Config, ConfigError, config_from_dict, dump_config
from cliplung.data.ingest import build_datasets, open_training_store
from cliplung.storage import check_endpoint, is_s3, parse_location, pyarrow_filesystem
from cliplung.train.trainer import _write_run_manifest, build_trainer

__all__ = [
    "EPOCHS_DONE",
    "TRIAL_DRIVER_CPUS",
    "SearchPlan",
    "TuneSummary",
    "apply_params",
    "open_study_storage",
    "search_space",
    "tune_search",
]

logger = logging.getLogger(__name__)

EPOCHS_DONE = "epochs_done"
"""Result key added to every trial report: epochs finished (``epoch + 1``); ASHA's time axis."""
TRIAL_ID_ATTR = "ray_trial_id"
"""Optuna user attribute naming the Ray Tune trial behind an Optuna trial."""
TRIAL_DRIVER_CPUS = 0.1
"""CPUs held by each trial's Tune function. It only drives a Train run (the trainer asks for its
own workers), but Tune's placement group cannot be empty."""
DASHBOARD_PORT = 8081
"""Port suggested for optuna-dashboard (Ray's dashboard has 8265)."""
SUMMARY_METRICS = ("val/macro_f1", "val/accuracy", "val/auc", "train/loss")


# --------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class SearchPlan:
    """What a search varies (Optuna distributions) and what it holds fixed, by config field."""

    distributions: dict[str, BaseDistribution]
    fixed: dict[str, Any]


def search_space(config: Config) -> SearchPlan:
    """The search space of ``config.tune.space``; raises :class:`ConfigError` when it is empty or
    contradicts the rest of the config."""
    space, model = config.tune.space, config.model
    bad = [n for n in space.n_ctx if model.feature_channels % n]
    if bad:
        divisors = [d for d in range(1, model.feature_channels + 1) if model.feature_channels % d == 0]
        raise ConfigError(
            f"tune.space.n_ctx: {bad} do not divide model.feature_channels={model.feature_channels} "
            f"(one channel group per context token); choose from {divisors}"
        )
    distributions: dict[str, BaseDistribution] = {}
    fixed: dict[str, Any] = {}
    choices = tuple(dict.fromkeys(space.n_ctx))
    if len(choices) > 1:
        distributions["model.n_ctx"] = CategoricalDistribution(choices)
    else:
        fixed["model.n_ctx"] = choices[0]
    for key, (low, high), log in (
        ("model.lambda_ic", space.lambda_ic, False),
        ("model.lambda_ca", space.lambda_ca, False),
        ("model.lambda_ia", space.lambda_ia, False),
        ("train.lr", space.lr, True),
        ("train.weight_decay", space.weight_decay, True),
    ):
        if low == high:
            fixed[key] = low
        else:
            distributions[key] = FloatDistribution(low, high, log=log)
    if not distributions:
        raise ConfigError(
            "tune.space: the search space is empty: every parameter has a single value "
            f"({', '.join(f'{k}={v}' for k, v in fixed.items())}); widen a range or list several n_ctx"
        )
    if model.method == "ce":
        unused = [k for k in distributions if k.startswith(("model.n_ctx", "model.lambda_"))]
        if unused:
            raise ConfigError(
                f"tune.space: model.method='ce' has no prompts and no contrastive losses, so searching "
                f"{unused} changes nothing; give them a single value or use method cliplung/coop/cocoop"
            )
    return SearchPlan(distributions, fixed)


def apply_params(config: Config, params: dict[str, Any]) -> Config:
    """``config`` with ``{"section.field": value}`` applied (validated like any config)."""
    data = config.to_dict()
    for key, value in params.items():
        section, _, name = key.partition(".")
        if section not in data or not isinstance(data[section], dict) or name not in data[section]:
            raise ConfigError(f"{key}: no such config field")
        data[section][name] = value.item() if hasattr(value, "item") else value
    return config_from_dict(data)


# --------------------------------------------------------------------------- the study database


def _safe_url(url: str) -> str:
    """The URL without its password, for messages and summaries."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def open_study_storage(url: str) -> optuna.storages.RDBStorage:
    """Open (creating tables if needed) the Optuna RDB at ``url``; a :class:`ConfigError` naming
    the URL when it cannot be reached."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ConfigError(f"tune.study_db: {url!r} is not a SQLAlchemy database URL ({exc})") from None
    engine_kwargs: dict = {}
    if not parsed.drivername.startswith("sqlite"):
        # Fail in seconds, not after the OS's TCP timeout, when the server is down.
        engine_kwargs = {"connect_args": {"connect_timeout": 5}, "pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs or None)
    except Exception as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise ConfigError(
            f"tune.study_db: cannot open the Optuna study database {_safe_url(url)} "
            f"({type(exc).__name__}: {reason})"
        ) from None


def default_study_url(config: Config) -> str:
    """``tune.study_db``, or a SQLite file in the search directory (local storage only)."""
    if config.tune.study_db:
        return config.tune.study_db
    if is_s3(config.storage.path):
        raise ConfigError(
            f"tune.study_db: storage {config.storage.path} is on S3, where a SQLite study cannot live; "
            "pass --study-db with a database URL (e.g. postgresql://user@host/optuna, or "
            "sqlite:////local/disk/optuna.db)"
        )
    path = os.path.join(parse_location(config.storage.path).path, config.name, "optuna.db")
    return f"sqlite:///{path}"


# --------------------------------------------------------------------------- Ray pieces


class _EpochReport(TuneReportCallback):
    """Forwards each epoch's report from the Train run to Tune, adding ``epochs_done``."""

    def after_report(self, run_context, metrics, checkpoint):
        first = dict(metrics[0])
        first[EPOCHS_DONE] = int(first.get("epoch", -1)) + 1
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that tags each Optuna trial with its Ray trial id, steps intermediate
    values by ``epochs_done`` (stable across a resume), and tells Optuna PRUNED for trials that
    stopped before ``max_epochs`` (ASHA, or an extra ``stop`` rule), so Optuna's best trial is
    always one trained to the end."""

    def __init__(self, *args, max_epochs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_epochs = max_epochs

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        if params is not None:
            self._ot_trials[trial_id].set_user_attr(TRIAL_ID_ATTR, trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value = result.get(self.metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        step = int(result.get(EPOCHS_DONE, result.get("training_iteration", 0)))
        try:
            with warnings.catch_warnings():
                # A step can arrive twice (the last result, a resumed trial): Optuna keeps the first.
                warnings.filterwarnings("ignore", message=".*is already reported")
                self._ot_trials[trial_id].report(float(value), step)
        except Exception as exc:  # a trial already told before the driver died
            logger.warning("optuna: not recording %s of %s: %s", self.metric, trial_id, exc)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if result and not error:
            # Tune hands the last result only to on_trial_complete: record it as a step as well.
            self.on_trial_result(trial_id, result)
        done = int(result.get(EPOCHS_DONE, self._max_epochs)) if result else self._max_epochs
        if error or not result or done >= self._max_epochs:
            super().on_trial_complete(trial_id, result, error)
            return
        try:
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        except Exception as exc:
            logger.warning("optuna: cannot mark %s pruned: %s", trial_id, exc)
        self._completed_trials.add(trial_id)


@ray.remote(num_cpus=0)
class _PlacementGroupWatchdog:
    """Removes a Train run's worker placement group once its controller actor is gone.

    Train V2 has a cleaner for this (its controller dies with the trial actor when ASHA stops a
    trial), but the cleaner finds the controller through the State API with an auto-detected
    address, which fails when several Ray instances share the host ("Found multiple active Ray
    instances"). Then every stopped trial leaks its workers' CPUs until the search stalls. This
    watchdog needs no State API: it pings the controller's actor handle.
    """

    def __init__(self, controller, placement_group):
        self._controller = controller
        self._pg = placement_group

    def watch(self, interval_s: float = 2.0) -> None:
        from ray.exceptions import GetTimeoutError, RayActorError
        from ray.util.placement_group import placement_group_table, remove_placement_group

        while True:
            try:
                ray.get(self._controller.__ray_ready__.remote(), timeout=30)
            except GetTimeoutError:
                continue
            except RayActorError:
                break
            time.sleep(interval_s)
        if placement_group_table(self._pg).get("state") not in (None, "REMOVED"):
            remove_placement_group(self._pg)
        ray.actor.exit_actor()


class _ReleaseWorkersWithController(WorkerGroupCallback):
    """Starts a :class:`_PlacementGroupWatchdog` for each worker group the controller starts."""

    def after_worker_group_start(self, worker_group) -> None:
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        watchdog = _PlacementGroupWatchdog.options(
            lifetime="detached",
            # Outside the trial's placement group, which dies with the trial.
            scheduling_strategy="DEFAULT",
        ).remote(ray.get_runtime_context().current_actor, pg)
        watchdog.watch.remote()


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _runs_root(config: Config) -> str:
    """Where the trials' Train runs live: ``<storage>/<name>/runs``."""
    _, root = pyarrow_filesystem(config.storage.path, endpoint=config.storage.endpoint)
    prefix = "s3://" if is_s3(config.storage.path) else ""
    return f"{prefix}{root}/{config.name}/runs"


def trial_config(base: Config, params: dict[str, Any], trial_id: str, runs_root: str) -> Config:
    """The training config of one trial: the searched values applied, its own Train run."""
    config = apply_params(base, params)
    return config.replace(name=trial_id, storage=dataclasses.replace(config.storage, path=runs_root))


def _read_final_state(config: Config) -> dict | None:
    """``train_state.json`` of the trial's last-epoch checkpoint when its Train run is complete."""
    fs, root = pyarrow_filesystem(config.storage.path, endpoint=config.storage.endpoint)
    path = f"{root}/{config.name}/epoch_{config.train.epochs - 1:04d}/train_state.json"
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError, ValueError):
        return None


def _trial_driver(params: dict, *, base: dict, runs_root: str) -> None:
    """Tune function of one trial: a full Train run of the base config with ``params`` applied."""
    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(config_from_dict(base), params, trial_id, runs_root)
    final = _read_final_state(config)
    if final is not None:
        # The Train run finished before the search driver was interrupted; report its final
        # epoch again rather than train (Train would restore and find nothing left to do).
        metrics = dict(final["metrics"])
        metrics[EPOCHS_DONE] = int(final["epoch"]) + 1
        ray.tune.report(metrics)
        return
    store, splits = open_training_store(config)
    datasets = build_datasets(config, store, splits)
    t = config.train
    steps_per_epoch = (len(splits.train) // t.workers) // t.micro_batch_size
    _write_run_manifest(config, splits)
    trainer = build_trainer(config, datasets, steps_per_epoch)
    # build_trainer owns storage, checkpointing and failure handling; the search adds its report
    # hook and a watchdog that frees the workers if the trial is stopped (ASHA) or dies.
    trainer.run_config.callbacks += [_EpochReport(), _ReleaseWorkersWithController()]
    trainer.fit()


# --------------------------------------------------------------------------- summary


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
            f"  watch the study:  optuna-dashboard {self.study_db} --host 127.0.0.1 --port {DASHBOARD_PORT}",
            f"  curves:           tensorboard --logdir {self.run_dir}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _trial_rows(results, study: optuna.Study, plan: SearchPlan, metric: str, mode: str) -> list[dict]:
    """One row per Tune trial: its Optuna state and number, epochs, last and best metric, params."""
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
        row["checkpoint"] = last.get("checkpoint_path")
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


def _write_bytes(fs, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


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


# --------------------------------------------------------------------------- the search


def _check(config: Config) -> None:
    tc, t = config.tune, config.train
    if not tc.metric.startswith(("val/", "train/")):
        raise ConfigError(
            f"tune.metric: {tc.metric!r} is not a reported metric; use a val/ or train/ one such as "
            "val/macro_f1, val/auc, val/accuracy or train/loss"
        )
    if tc.asha and tc.grace_period >= t.epochs:
        raise ConfigError(
            f"tune.grace_period: ASHA can only stop a trial after grace_period={tc.grace_period} epochs, "
            f"but trials run train.epochs={t.epochs}; lower it, raise train.epochs or set tune.asha=false"
        )


def _absolute_paths(config: Config) -> Config:
    """Trial actors run in their own working directories: local paths must be absolute."""
    data = config.to_dict()
    if not is_s3(config.data.store):
        data["data"]["store"] = parse_location(config.data.store).path
    if not is_s3(config.storage.path):
        data["storage"]["path"] = parse_location(config.storage.path).path
    pretrained = config.model.text_pretrained
    if pretrained and os.path.exists(pretrained):
        data["model"]["text_pretrained"] = os.path.abspath(pretrained)
    return config_from_dict(data)


def _read_saved_config(fs, run_dir: str) -> Config:
    with fs.open_input_stream(f"{run_dir}/config.yaml") as f:
        return config_from_dict(yaml.safe_load(f.read().decode()))


def _trainable(config: Config):
    fn = ray.tune.with_parameters(_trial_driver, base=config.to_dict(), runs_root=_runs_root(config))
    return ray.tune.with_resources(fn, {"CPU": TRIAL_DRIVER_CPUS})


def tune_search(
    config: Config, *, resume: bool = False, address: str | None = None, stop: Any = None
) -> TuneSummary:
    """Run (or with ``resume=True`` continue) the search ``(config.storage.path, config.name)``.

    Everything that can be checked without Ray is checked first and raises
    :class:`ConfigError` (or the store's own error): the search space, the study database, the
    nodule store, the object-store endpoint. ``stop`` is an optional extra Tune stopping rule
    (e.g. a compute budget, see :mod:`cliplung.bench.tune`).
    """
    config = _absolute_paths(config)
    # Checks that need nothing but the config come first (no storage or network touched yet).
    search_space(config)
    _check(config)
    default_study_url(config)
    if is_s3(config.storage.path):
        check_endpoint(config.storage.endpoint)
    fs, root = pyarrow_filesystem(config.storage.path, endpoint=config.storage.endpoint)
    run_dir = f"{root}/{config.name}"
    display_dir = f"s3://{run_dir}" if is_s3(config.storage.path) else run_dir
    restorable = ray.tune.Tuner.can_restore(run_dir, storage_filesystem=fs)
    notes: list[str] = []
    if resume:
        if not restorable:
            raise ConfigError(
                f"tune: nothing to resume at {display_dir} (no Tune experiment state there); check "
                "--storage and --name, or start the search without --resume"
            )
        saved = _read_saved_config(fs, run_dir)
        changed = [
            k
            for k, v in config.to_dict().items()
            if k not in ("storage", "metrics") and saved.to_dict()[k] != v
        ]
        if changed:
            notes.append(f"resume uses the search's saved configuration; ignored changes to {changed}")
        config = saved.replace(storage=config.storage, metrics=config.metrics)
    elif restorable:
        raise ConfigError(
            f"tune: {display_dir} already holds a search; pass --resume to continue it or choose another --name"
        )

    plan = search_space(config)
    _check(config)
    study_url = default_study_url(config)
    open_training_store(config)  # a bad store or split fails here, before Ray starts
    if not config.tune.study_db:
        os.makedirs(run_dir, exist_ok=True)  # the default SQLite file lives in the search directory
    storage = open_study_storage(study_url)
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    if resume and config.name not in existing:
        raise ConfigError(
            f"tune.study_db: study {config.name!r} is missing from {_safe_url(study_url)}; "
            "resume needs the database the search started with"
        )
    if not resume and config.name in existing:
        if existing[config.name].n_trials:
            raise ConfigError(
                f"tune.study_db: {_safe_url(study_url)} already holds a study {config.name!r} with "
                f"{existing[config.name].n_trials} trials; choose another --name (or delete the study)"
            )
        optuna.delete_study(study_name=config.name, storage=storage)  # left by a start that died early

    t, tc = config.train, config.tune
    ensure_ray(
        address,
        num_cpus=max(os.cpu_count() or 1, tc.max_concurrent * t.workers * t.cpus_per_worker + 2),
    )
    if resume:
        tuner = ray.tune.Tuner.restore(
            run_dir, trainable=_trainable(config), resume_errored=True, storage_filesystem=fs
        )
    else:
        with fs.open_output_stream(f"{run_dir}/config.yaml") as f:
            f.write(dump_config(config).encode())
        tuner = ray.tune.Tuner(
            _trainable(config),
            tune_config=ray.tune.TuneConfig(
                search_alg=ConcurrencyLimiter(
                    _searcher(config, plan, storage), max_concurrent=tc.max_concurrent
                ),
                scheduler=_scheduler(config),
                num_samples=tc.trials,
                trial_dirname_creator=_trial_dirname,
                # A trial function blocks in trainer.fit() until its Train run ends, which Tune's
                # actor reuse (reset within 2 s) cannot wait for.
                reuse_actors=False,
            ),
            run_config=ray.tune.RunConfig(
                name=config.name,
                storage_path=root,
                storage_filesystem=fs,
                callbacks=[TBXLoggerCallback()],
                stop=stop,
                failure_config=ray.tune.FailureConfig(max_failures=0),
            ),
        )
    results = tuner.fit()
    return _summarize(config, plan, storage, study_url, results, fs, run_dir, display_dir, notes)


def _searcher(config: Config, plan: SearchPlan, storage) -> StudySearch:
    tc = config.tune
    sampler = optuna.samplers.TPESampler(seed=tc.seed)
    return StudySearch(
        plan.distributions,
        metric=tc.metric,
        mode=tc.mode,
        sampler=sampler,
        study_name=config.name,
        storage=storage,
        max_epochs=config.train.epochs,
    )


def _scheduler(config: Config):
    tc = config.tune
    if not tc.asha:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=EPOCHS_DONE,
        metric=tc.metric,
        mode=tc.mode,
        max_t=config.train.epochs,
        grace_period=tc.grace_period,
        reduction_factor=tc.reduction_factor,
    )


def _reconcile_study(study: optuna.Study, results, metric: str, max_epochs: int) -> list[str]:
    """Make the study agree with Tune's final word on every trial, once nothing runs any more.

    Three cases the searcher cannot see: a trial that errored (told FAIL) and succeeded when the
    search was resumed (``resume_errored``) gets a completed copy, since Optuna cannot reopen a
    finished trial; a trial whose result never reached the searcher is told now; and an Optuna
    trial asked by a driver that died before Tune saved it (no Tune trial will ever report it)
    is closed as FAIL.
    """
    notes: list[str] = []
    by_ray_id = {t.user_attrs.get(TRIAL_ID_ATTR): t for t in study.get_trials(deepcopy=False)}
    for result in results:
        trial_id = os.path.basename(str(result.path).rstrip("/"))
        last = result.metrics or {}
        ot = by_ray_id.get(trial_id)
        if ot is None or ot.state in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        if result.error or last.get(metric) is None:
            if ot.state == TrialState.RUNNING:
                study.tell(ot.number, state=TrialState.FAIL, skip_if_finished=True)
            continue
        finished = int(last.get(EPOCHS_DONE, 0)) >= max_epochs
        state = TrialState.COMPLETE if finished else TrialState.PRUNED
        value = float(last[metric]) if finished else None
        if ot.state == TrialState.RUNNING:
            study.tell(ot.number, value, state=state, skip_if_finished=True)
            continue
        study.add_trial(
            optuna.trial.create_trial(
                params=ot.params,
                distributions=ot.distributions,
                value=value,
                state=state,
                intermediate_values={
                    **ot.intermediate_values,
                    int(last.get(EPOCHS_DONE, 0)): float(last[metric]),
                },
                user_attrs={**ot.user_attrs, "rerun_of_optuna_trial": ot.number},
            )
        )
        notes.append(
            f"trial {trial_id} failed as Optuna trial {ot.number} and succeeded on resume: recorded again"
        )
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for ot in orphans:
        study.tell(ot.number, state=TrialState.FAIL, skip_if_finished=True)
    if orphans:
        notes.append(
            f"closed {len(orphans)} Optuna trial(s) left RUNNING by an interrupted driver as FAIL "
            f"({[ot.number for ot in orphans]})"
        )
    return notes


def _summarize(config, plan, storage, study_url, results, fs, run_dir, display_dir, notes) -> TuneSummary:
    tc = config.tune
    study = optuna.load_study(study_name=config.name, storage=storage)
    notes += _reconcile_study(study, results, tc.metric, config.train.epochs)
    rows = _trial_rows(results, study, plan, tc.metric, tc.mode)
    summary = TuneSummary(
        name=config.name,
        run_dir=display_dir,
        study_db=_safe_url(study_url),
        metric=tc.metric,
        mode=tc.mode,
        trials=rows,
        notes=notes,
    )
    summary.trials_csv = f"{display_dir}/trials.csv"
    _write_bytes(fs, f"{run_dir}/trials.csv", _csv_text(rows).encode())

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        params = {**plan.fixed, **best.params}
        best_config = apply_params(config, params).replace(name=f"{config.name}-best")
        _write_bytes(fs, f"{run_dir}/best.yaml", dump_config(best_config).encode())
        summary.best_config = f"{display_dir}/best.yaml"
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
        _write_bytes(fs, f"{run_dir}/{name}", data)
        summary.plots.append(f"{display_dir}/{name}")
    summary.notes += plot_notes
    errored = [r["trial_id"] for r in rows if r["state"] == "FAIL"]
    if errored:
        summary.notes.append(f"trials that failed: {errored} (their errors are in trials.csv)")
    return summary
