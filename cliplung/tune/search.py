"""Hyperparameter search in which every trial is a whole Ray Train run of the CLIP-Lung trainer.

    cliplung tune --config debug --data stores/phantom --storage runs --name search1 --trials 16

A search is a run (:mod:`cliplung.runs`) of kind ``search``, identified by ``(storage.path,
name)``. Its directory holds::

    <storage>/<name>/
      run.json  config.yaml  lease.json   the run record, the search's config, its driver's lease
      optuna.db                 the Optuna study when it is SQLite (the default, one machine only;
                                PostgreSQL for anything shared: see cliplung.tune.study)
      tune/                     Ray Tune's experiment (TUNE_DIR), which Tune alone writes:
        experiment_state-*.json   trial statuses, searcher and scheduler state, tuner.pkl
        <trial_id>/               per-trial logs: result.json, progress.csv, TensorBoard events
      runs/<trial_id>/          the trial's training run: run.json, splits.json, epoch_NNNN/
      trials.csv  best.yaml  optimization_history.png  param_importances.png   (the summary)

The parts: the search space (:mod:`cliplung.tune.space`); the study and its searcher
(:mod:`cliplung.tune.study`, behind a ``ConcurrencyLimiter(tune.max_concurrent)``); with
``tune.asha`` the ASHA scheduler on ``epochs_done`` (grace period ``tune.grace_period``, halving
rate ``tune.reduction_factor``, ``max_t = train.epochs``); and the trial, a small Tune function
(:func:`_trial`) that calls the same :func:`cliplung.train.trainer.train` as ``cliplung train``
with Tune's ``TuneReportCallback``. It reserves ``TRIAL_DRIVER_CPUS`` for itself; the trainer
places its own workers, so a trial can be 2 CPU workers, 4 GPUs, or a quarter of one.

**Starting again.** A search started again with the same name, storage and config continues
where it stopped (``Tuner.restore(resume_errored=True)``): finished trials are kept as they are,
unfinished and errored ones start their Tune function again, and its training run resumes from
its newest complete checkpoint. A trial whose run had finished all its epochs before the driver
died re-reports its final metrics instead of training again. ``--resume`` only adds the check that
a search exists. Another config (or search space) under the same name is refused, naming what
differs. When the search ends the study is reconciled with Tune's results
(:func:`cliplung.tune.study.reconcile_study`). A RayJob's retry is exactly this: the same command.

**The study** is claimed by its search (the study attribute :data:`SEARCH_ATTR` holds the
search's location): another search of the same name in a shared database is refused, never fed
into it or deleted. The config records ``tune.study_db`` without its password, whatever its
source (:func:`cliplung.tune.study.study_db`).

**Before anything is written** everything that can be checked without Ray is: the search space,
the study database's URL and reachability, the nodule store, the object-store endpoint, that the
search directory can be one (created, with its parents, only then), that the name is not a
training run's, and a changed config. Each failure is a :class:`ConfigError`, ``StorageError``
or ``RunError``, which ``cliplung`` prints as one line with exit code 2.

Tune's experiment has a folder of its own because a restored Tune copies every ``.json`` and
``.pkl`` file at the top of its experiment folder to its staging folder and syncs them back later:
a ``lease.json`` beside them came back stale and took the lease from the driver holding it.

**Placement groups.** A trial that ASHA stops is killed by Tune; Ray Train's own clean-up then
frees its workers' placement group. That clean-up finds the cluster through ``RAY_ADDRESS``, which
:func:`cliplung.cluster.ensure_ray` exports for its embedded cluster.

Watching a search: the Ray dashboard (``http://127.0.0.1:8265`` for the embedded Ray) lists the
driver, the trial actors and each trial's Train run; ``optuna-dashboard <study-db> --host
127.0.0.1 --port 8081`` shows the study; ``tensorboard --logdir <storage>/<name>`` the per-trial
curves (Tune's TensorBoardX logger).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import optuna
import ray
import ray.train
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter

from cliplung.cluster import check_placement, ensure_ray
from cliplung.config import Config, ConfigError, config_from_dict
from cliplung.data.ingest import open_training_store
from cliplung.runs import Run, RunError
from cliplung.storage import (
    StorageError,
    aws_keys_off_the_environment,
    check_endpoint,
    is_s3,
    parse_location,
    pyarrow_filesystem,
)
from cliplung.tune.space import SearchPlan, apply_params, search_space, trial_config
from cliplung.tune.study import (
    EPOCHS_DONE,
    TRIAL_ID_ATTR,
    StudyDB,
    StudySearcher,
    open_study_storage,
    study_db,
)
from cliplung.tune.summary import TuneSummary, summarize

__all__ = [
    "EPOCHS_DONE",
    "SEARCH_MAY_CHANGE",
    "TRIAL_DRIVER_CPUS",
    "TRIAL_ID_ATTR",
    "TUNE_DIR",
    "SearchPlan",
    "TuneSummary",
    "apply_params",
    "search_space",
    "trial_config",
    "tune_search",
]

TRIAL_DRIVER_CPUS = 0.1
"""CPUs held by each trial's Tune function. It only drives a Train run (the trainer asks for its
own workers), but Tune's placement group cannot be empty."""
TUNE_DIR = "tune"
"""Ray Tune's experiment folder inside the search directory."""
SEARCH_MAY_CHANGE = ("name", "preset", "storage", "metrics", "data.store")
"""What a search may change between starts: where it lives and its metrics export. Everything
else (search space, trial count, concurrency, training config) is fixed by Tune's saved state."""


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


def _trial(params: dict, *, base: dict, runs_root: str) -> None:
    """Tune function of one trial: a full training run of the base config with ``params`` applied.

    A worker failure is retried here, up to ``train.max_failures`` times, each retry a new Train
    run that resumes the trial's run from its last checkpoint; Ray Train itself retries nothing
    in a trial. When Tune stops a trial (ASHA), the trial's Train controller can see its workers
    die before it dies itself; a Ray Train retry at that moment creates a placement group that
    nothing ever removes (Ray 2.60's placement-group cleaner learns of a group only once its
    workers have started; seen in a CI run: a 1-CPU bundle held after an ASHA stop until the
    cluster ended). A retry here dies with the trial's actor instead."""
    from cliplung.train.trainer import train

    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(config_from_dict(base), params, trial_id, runs_root)
    retries = config.train.max_failures
    once = config.replace(train=dataclasses.replace(config.train, max_failures=0))
    attempt = 0
    while True:
        try:
            # The search's driver holds the lease of the whole search directory.
            summary = train(once, callbacks=[TuneReportCallback()], lease=False)
            break
        except ray.train.WorkerGroupError as exc:
            if attempt >= retries:
                raise
            attempt += 1
            what = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(":")
            print(
                f"trial {trial_id}: {what}; retry {attempt} of {retries} (train.max_failures), "
                "from its last checkpoint",
                flush=True,
            )
    if summary.already_complete:
        # The run finished before the search driver was interrupted: Tune never saw its last
        # report, so report it again rather than train (there is nothing left to train).
        ray.tune.report({**summary.metrics, EPOCHS_DONE: summary.epochs_done})


def _trainable(config: Config, runs_root: str):
    fn = ray.tune.with_parameters(_trial, base=config.to_dict(), runs_root=runs_root)
    return ray.tune.with_resources(fn, {"CPU": TRIAL_DRIVER_CPUS})


def _trial_dirname(trial) -> str:
    return trial.trial_id


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


def _new_tuner(config: Config, plan: SearchPlan, db: StudyDB, search: Run, stop: Any) -> ray.tune.Tuner:
    tc = config.tune
    searcher = StudySearcher(
        plan.distributions,
        metric=tc.metric,
        mode=tc.mode,
        study_name=config.name,
        study_url=db.url,
        seed=tc.seed,
        max_epochs=config.train.epochs,
    )
    fs, root = pyarrow_filesystem(search.location, endpoint=search.endpoint)
    return ray.tune.Tuner(
        _trainable(config, search.path("runs")),
        tune_config=ray.tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=tc.max_concurrent),
            scheduler=_scheduler(config),
            num_samples=tc.trials,
            trial_dirname_creator=_trial_dirname,
            # A trial function blocks in train() until its Train run ends, which Tune's actor
            # reuse (reset within 2 s) cannot wait for.
            reuse_actors=False,
        ),
        run_config=ray.tune.RunConfig(
            name=TUNE_DIR,
            storage_path=root,
            storage_filesystem=fs,
            callbacks=[TBXLoggerCallback()],
            stop=stop,
            failure_config=ray.tune.FailureConfig(max_failures=0),
        ),
    )


SEARCH_ATTR = "cliplung_search"
"""Study user attribute: the location of the search that owns the study. Two searches that share
a database under the same name would otherwise feed one study."""


def _open_study(config: Config, db: StudyDB, search: Run, *, continuing: bool) -> optuna.storages.RDBStorage:
    """Open the study database and claim the study ``config.name`` for this search.

    A continued search must find its study. A new one creates it, tagged with its location, or
    takes over the one it created itself in a start that died before Tune saved any state (its
    asked trials are closed as FAIL when the search ends). A study of that name owned by another
    search is refused, whatever it holds: it is never shared, changed or deleted."""
    rdb = open_study_storage(db.url)
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(rdb)}
    summary = existing.get(config.name)
    if continuing:
        if summary is None:
            raise ConfigError(
                f"tune.study_db: study {config.name!r} is missing from {db.public}; "
                "continuing a search needs the database it started with"
            )
        return rdb
    if summary is not None:
        owner = summary.user_attrs.get(SEARCH_ATTR)
        if owner != search.location and (owner is not None or summary.n_trials):
            whose = f"search {owner}" if owner else "something other than cliplung tune"
            raise ConfigError(
                f"tune.study_db: {db.public} already holds a study {config.name!r} "
                f"({summary.n_trials} trials) made by {whose}; choose another --name"
            )
    study = optuna.create_study(
        study_name=config.name,
        storage=rdb,
        direction="maximize" if config.tune.mode == "max" else "minimize",
        load_if_exists=True,
    )
    study.set_user_attr(SEARCH_ATTR, search.location)
    return rdb


def _check_search_dir(search: Run, *, create: bool = False) -> None:
    """A local search directory must be (or be creatable as) a writable directory: checked before
    anything is written, created (with its parents) only once every other check passed, so a path
    that cannot be one fails naming it rather than somewhere inside Tune."""
    if is_s3(search.location):
        return
    path = parse_location(search.location).path
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    problem = None
    if not os.path.isdir(existing):
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem is None and create:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            problem = exc.strerror or str(exc)
    if problem:
        raise StorageError(
            f"storage.path: cannot create the search directory {path} ({problem}); check --storage and --name"
        )


def tune_search(
    config: Config, *, resume: bool = False, address: str | None = None, stop: Any = None
) -> TuneSummary:
    """Run the search ``(config.storage.path, config.name)``, or continue it if it exists.

    ``resume=True`` only insists that the search exists. Everything that can be checked without
    Ray is checked first and raises :class:`ConfigError` (or the store's or run's own error): the
    search space, the study database, the nodule store, the object-store endpoint, a changed
    config. ``stop`` is an optional extra Tune stopping rule (e.g. a compute budget, see
    :mod:`cliplung.bench.tune`).

    AWS keys in the environment are moved into a private in-memory credentials file while the
    search runs (:func:`cliplung.storage.aws_keys_off_the_environment`): Tune would otherwise copy
    them into its trial actors' runtime_env, which Ray logs in clear.
    """
    with aws_keys_off_the_environment():
        return _search(config, resume=resume, address=address, stop=stop)


def _search(config: Config, *, resume: bool, address: str | None, stop: Any) -> TuneSummary:
    config = _absolute_paths(config)
    plan = search_space(config)
    _check(config)
    db = study_db(config)
    if not db.is_default:
        # Recorded without its password, wherever the password came from (see cliplung.tune.study).
        config = config.replace(tune=dataclasses.replace(config.tune, study_db=db.public))
    if is_s3(config.storage.path):
        check_endpoint(config.storage.endpoint)
    search = Run.of(config)
    _check_search_dir(search)
    record = search.record()
    if record is not None and record.get("kind") != "search":
        raise RunError(f"{search.location} is a {record.get('kind')} run, not a search; use another --name")
    fs, root = pyarrow_filesystem(search.location, endpoint=search.endpoint)
    experiment = f"{root}/{TUNE_DIR}"
    continuing = ray.tune.Tuner.can_restore(experiment, storage_filesystem=fs)
    if resume and not continuing:
        raise ConfigError(
            f"tune: nothing to resume at {search.location} (no Tune experiment state there); check "
            "--storage and --name, or start the search without --resume"
        )
    store, _ = open_training_store(config)  # a bad store or split fails here, before Ray starts
    _check_search_dir(search, create=True)
    open_study_storage(db.url)  # an unreachable study database fails here too
    with search.lease(purpose=f"cliplung tune {config.name}"):
        rdb = _open_study(config, db, search, continuing=continuing)
        try:
            search.start(config, kind="search", store=store, may_change=SEARCH_MAY_CHANGE)
        except RunError as exc:
            raise RunError(f"{exc} (a search continues only with the config it started with)") from None
        ensure_ray(address, num_cpus=os.cpu_count() or 1)
        check_placement(config, drivers=TRIAL_DRIVER_CPUS)
        notes: list[str] = []
        if continuing:
            print(f"continuing search {config.name} from {search.location}", flush=True)
            tuner = ray.tune.Tuner.restore(
                experiment,
                trainable=_trainable(config, search.path("runs")),
                resume_errored=True,
                storage_filesystem=fs,
            )
        else:
            tuner = _new_tuner(config, plan, db, search, stop)
        results = tuner.fit()
        study = optuna.load_study(study_name=config.name, storage=rdb)
        return summarize(config, plan, study, db.public, results, search, search.path("runs"), notes)
