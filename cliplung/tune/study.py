"""The Optuna study of a search: its database, the searcher that feeds it, and the final reconciliation.

The study lives in a relational database (:func:`study_db`), so it outlives the driver and
``optuna-dashboard`` can show it while the search runs: PostgreSQL (``postgresql+psycopg://``) for
any search that more than one machine touches, a SQLite file for one machine (the default: in the
search directory). Every Optuna trial carries its Ray trial id as the user attribute
``ray_trial_id``.

**The password.** The URL comes from ``tune.study_db`` (``--study-db``), else ``OPTUNA_STORAGE``
(the variable Optuna's own CLI reads). Its password may be in it, or come from the file named by
``CLIPLUNG_STUDY_DB_PASSWORD_FILE``, or, for PostgreSQL, from libpq's own ``PGPASSWORD`` /
``~/.pgpass``. Whatever the source, the password lives only in this process's memory: the search
records the URL without it (:attr:`StudyDB.public`: in its config, its run record, its trials'
configs and checkpoints, ``best.yaml``, the searcher Tune pickles), and
:data:`_CONNECT_URLS` maps that form back to the full URL for the searcher in this driver.

:class:`StudySearcher` is Optuna's ask-and-tell behind Ray Tune's public ``Searcher`` interface,
written on Optuna's public API alone (``Study.ask``/``tell``, ``Trial.report``, the storage's
public methods), so no private attribute of Ray's ``OptunaSearch`` or of Optuna is touched:

* ``suggest``: asks the study (TPE sampler seeded with ``tune.seed``, plus the number of trials
  already in the study when a resumed driver reopens it, so a resume never draws the search's first
  configurations again) for a trial over the plan's distributions and tags it with the Ray trial id;
* ``on_trial_result``: reports the metric as an intermediate value at step ``epochs_done``
  (stable across a resume, unlike Tune's ``training_iteration``);
* ``on_trial_complete``: tells COMPLETE with the last value when the trial ran all its epochs,
  PRUNED when it stopped earlier (ASHA), FAIL on an error, so Optuna's best trial is always one
  trained to the end;
* ``save``/``restore``: the map from Ray trial ids to Optuna trial numbers, as JSON; Tune saves it
  with its experiment state and a resumed search continues with it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState
from ray.tune.search import Searcher

from cliplung.config import Config, ConfigError, mask_url_password
from cliplung.storage import is_s3, parse_location

__all__ = [
    "EPOCHS_DONE",
    "PASSWORD_FILE_ENV",
    "STORAGE_ENV",
    "TRIAL_ID_ATTR",
    "StudyDB",
    "StudySearcher",
    "connect_url",
    "open_study_storage",
    "public_url",
    "reconcile_study",
    "safe_url",
    "study_db",
]

logger = logging.getLogger(__name__)

EPOCHS_DONE = "epochs_done"
"""Result key of every training report: epochs finished (``epoch + 1``); ASHA's time axis."""
TRIAL_ID_ATTR = "ray_trial_id"
"""Optuna user attribute naming the Ray Tune trial behind an Optuna trial."""


# --------------------------------------------------------------------------- the database


def safe_url(url: str) -> str:
    """The URL with its password masked (``***``), for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return mask_url_password(url)


def public_url(url: str) -> str:
    """The URL without its password: what a search records (and what ``optuna-dashboard`` takes
    when the password comes from ``PGPASSWORD``)."""
    from sqlalchemy.engine import make_url

    try:
        return _without_password(make_url(url))
    except Exception:
        return mask_url_password(url)


def open_study_storage(url: str) -> optuna.storages.RDBStorage:
    """Open (creating tables if needed) the Optuna RDB at ``url``; a :class:`ConfigError` naming
    the URL (never its password) when it cannot be reached."""
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
            f"tune.study_db: cannot open the Optuna study database {safe_url(url)} "
            f"({type(exc).__name__}: {reason})"
        ) from None


STORAGE_ENV = "OPTUNA_STORAGE"
"""The study database's URL when ``tune.study_db`` is not set (Optuna's CLI reads it too)."""
PASSWORD_FILE_ENV = "CLIPLUNG_STUDY_DB_PASSWORD_FILE"
"""A file holding the study database's password, for a URL that has none (e.g. a mounted Secret)."""

_CONNECT_URLS: dict[str, str] = {}
"""Public URL -> URL with its password, for this process only. The searcher is pickled by Tune
(``tuner.pkl``, its experiment state) with the public URL and finds the password here again
when the driver restores it; nothing else of it is ever written."""


@dataclass(frozen=True)
class StudyDB:
    """Where a search's study lives. ``public`` (the URL without its password) is what the search
    writes and prints; ``url`` is what it connects with and never leaves this process."""

    url: str
    public: str
    source: str
    """Where the URL came from: ``tune.study_db``, ``OPTUNA_STORAGE`` or ``default``."""

    def __repr__(self) -> str:
        return f"StudyDB({self.public!r}, source={self.source!r})"

    @property
    def is_default(self) -> bool:
        return self.source == "default"


def _without_password(url) -> str:
    from sqlalchemy.engine import URL

    bare = URL.create(url.drivername, url.username, None, url.host, url.port, url.database, url.query)
    return bare.render_as_string(hide_password=False)


def _read_password_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            password = f.read().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(
            f"{PASSWORD_FILE_ENV}: cannot read the study database password from {path} ({exc.strerror})"
        ) from None
    if not password:
        raise ConfigError(f"{PASSWORD_FILE_ENV}: {path} is empty")
    return password


def study_db(config: Config) -> StudyDB:
    """The study database of ``config``'s search: ``tune.study_db``, else ``$OPTUNA_STORAGE``,
    else a SQLite file in the search directory (local storage only); its password as the module
    docstring says. A relative SQLite path is made absolute (the driver's working directory is
    not the trials')."""
    from sqlalchemy.engine import make_url

    if config.tune.study_db:
        url, source = config.tune.study_db, "tune.study_db"
    elif os.environ.get(STORAGE_ENV):
        url, source = os.environ[STORAGE_ENV], STORAGE_ENV
    elif is_s3(config.storage.path):
        raise ConfigError(
            f"tune.study_db: storage {config.storage.path} is on S3, where a SQLite study cannot live; "
            f"pass --study-db or set {STORAGE_ENV} to a database URL (e.g. "
            "postgresql+psycopg://optuna@host:5432/optuna, password from PGPASSWORD or "
            f"{PASSWORD_FILE_ENV}), or sqlite:////local/disk/optuna.db for one machine"
        )
    else:
        path = os.path.join(parse_location(config.storage.path).path, config.name, "optuna.db")
        url, source = f"sqlite:///{path}", "default"
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ConfigError(f"{source}: {safe_url(url)!r} is not a SQLAlchemy database URL ({exc})") from None
    if parsed.drivername.startswith("sqlite") and parsed.database and parsed.database != ":memory:":
        parsed = parsed.set(database=os.path.abspath(parsed.database))
    if parsed.password is None and os.environ.get(PASSWORD_FILE_ENV):
        parsed = parsed.set(password=_read_password_file(os.environ[PASSWORD_FILE_ENV]))
    db = StudyDB(
        url=parsed.render_as_string(hide_password=False), public=_without_password(parsed), source=source
    )
    _CONNECT_URLS[db.public] = db.url
    return db


def connect_url(url: str) -> str:
    """The URL to connect with for ``url`` (a public one registered by :func:`study_db` in this
    process gets its password back)."""
    return _CONNECT_URLS.get(url, url)


# --------------------------------------------------------------------------- the searcher


class StudySearcher(Searcher):
    """Optuna ask-and-tell behind Ray Tune's ``Searcher`` (see the module docstring)."""

    def __init__(
        self,
        distributions: dict[str, BaseDistribution],
        *,
        metric: str,
        mode: str,
        study_name: str,
        study_url: str,
        seed: int,
        max_epochs: int,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.distributions = distributions
        self.study_name = study_name
        public = public_url(study_url)
        if public != study_url:
            _CONNECT_URLS[public] = study_url
        self.study_url = public
        """Never the password: Tune pickles the searcher (:func:`connect_url` finds it again)."""
        self.seed = seed
        self.max_epochs = max_epochs
        self.numbers: dict[str, int] = {}
        """Ray trial id -> Optuna trial number."""
        self.finished: set[str] = set()
        self._study: optuna.Study | None = None
        self._storage: optuna.storages.RDBStorage | None = None
        self._live: dict[str, optuna.Trial] = {}

    # The study and live trial objects hold database connections: reopened after unpickling.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_study=None, _storage=None, _live={})
        return state

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._storage = open_study_storage(connect_url(self.study_url))
            study = optuna.create_study(
                study_name=self.study_name,
                storage=self._storage,
                sampler=optuna.samplers.TPESampler(seed=self.seed),
                direction="maximize" if self.mode == "max" else "minimize",
                load_if_exists=True,
            )
            # A study reopened by a resumed or restarted driver: a sampler seeded as at the start
            # would draw the search's first configurations again. Seeded by the trials already in
            # the study, a new search stays reproducible and a resumed one draws new points.
            drawn = len(study.get_trials(deepcopy=False))
            if drawn:
                study.sampler = optuna.samplers.TPESampler(seed=self.seed + drawn)
            self._study = study
        return self._study

    def _trial(self, trial_id: str) -> optuna.Trial:
        """The live Optuna trial of a Ray trial (rebuilt from its number after a resume)."""
        trial = self._live.get(trial_id)
        if trial is None:
            study = self.study
            assert self._storage is not None
            study_id = self._storage.get_study_id_from_name(self.study_name)
            internal = self._storage.get_trial_id_from_study_id_trial_number(study_id, self.numbers[trial_id])
            trial = self._live[trial_id] = optuna.trial.Trial(study, internal)
        return trial

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        trial = self.study.ask(self.distributions)
        trial.set_user_attr(TRIAL_ID_ATTR, trial_id)
        self.numbers[trial_id] = trial.number
        self._live[trial_id] = trial
        return dict(trial.params)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.finished or trial_id not in self.numbers:
            return
        value = result.get(self.metric)
        if not isinstance(value, int | float) or (isinstance(value, float) and math.isnan(value)):
            return
        step = int(result.get(EPOCHS_DONE, result.get("training_iteration", 0)))
        try:
            with warnings.catch_warnings():
                # A step can arrive twice (the last result, a resumed trial): Optuna keeps the first.
                warnings.filterwarnings("ignore", message=".*is already reported")
                self._trial(trial_id).report(float(value), step)
        except Exception as exc:  # a trial already told before the driver died
            logger.warning("optuna: not recording %s of %s: %s", self.metric, trial_id, exc)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.finished or trial_id not in self.numbers:
            return
        if result and not error:
            # Tune hands the last result only to on_trial_complete: record it as a step as well.
            self.on_trial_result(trial_id, result)
        number = self.numbers[trial_id]
        value = (result or {}).get(self.metric)
        done = int((result or {}).get(EPOCHS_DONE, 0))
        try:
            if error or not result or not isinstance(value, int | float) or math.isnan(float(value)):
                self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            elif done >= self.max_epochs:
                self.study.tell(number, float(value), skip_if_finished=True)
            else:
                self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
        except Exception as exc:
            logger.warning("optuna: cannot finish trial %s (%s): %s", trial_id, number, exc)
        self.finished.add(trial_id)
        self._live.pop(trial_id, None)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w", encoding="utf-8") as f:
            json.dump({"numbers": self.numbers, "finished": sorted(self.finished)}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, encoding="utf-8") as f:
            state = json.load(f)
        self.numbers = {str(k): int(v) for k, v in state["numbers"].items()}
        self.finished = set(state["finished"])
        self._live = {}

    def get_state(self) -> dict[str, Any]:
        return {"numbers": dict(self.numbers), "finished": sorted(self.finished)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.numbers = dict(state["numbers"])
        self.finished = set(state["finished"])


# --------------------------------------------------------------------------- reconciliation


def reconcile_study(study: optuna.Study, results, metric: str, max_epochs: int) -> list[str]:
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
