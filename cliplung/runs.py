"""A run: everything cliplung keeps under ``<storage>/<name>/``, owned here and only here.

A *run* is identified by its storage location (a local directory or ``s3://bucket/prefix``) and
its name. A training run, one Tune trial's training run and a whole search are all runs; this
module is the one place that knows their layout, records what they were started with, finds
their checkpoints, and keeps two drivers from writing the same one.

Layout of a training run::

    <storage>/<name>/
      run.json        the run record, written once by the first start: kind, created, the store's
                      identity and the config sections that define the experiment
      config.yaml     the config the run was created with (each checkpoint holds its own copy)
      splits.json     patient-level train / val / test rows, written once (evaluation's leak check
                      compares the store against it)
      lease.json      who is writing the run now (host, pid, start, heartbeat); gone when idle
      divergence.json the loop's record of a non-finite loss that stopped the run (if it did)
      checkpoint_manager_snapshot.json    Ray Train's record of the registered checkpoints
      epoch_NNNN/     one checkpoint per epoch (see cliplung.train.loop): model.pt, ema.pt, ...

A search (``cliplung tune``) keeps the same ``run.json``, ``config.yaml`` and ``lease.json`` and
Tune's own state; its trials are training runs under ``<storage>/<name>/runs/<trial_id>/``.

**Checkpoints** are found through Ray's own record of the run
(:meth:`ray.train.Result.from_path`, which reads the checkpoint manager's snapshot: only
checkpoints whose upload finished on every worker are in it). A bare folder of ``epoch_*``
checkpoints (copied by hand, no snapshot) still works: each one with both ``model.pt`` and
``train_state.json`` counts.

**Resume identity.** The first start writes ``run.json``; every later start with the same name
and storage is compared with it before any worker starts. Another store (by identity: the
store's creation time, row count and a hash of its ``patient_id`` and ``fold`` arrays) or a change
to a defining field is refused, naming what differs; :data:`MAY_CHANGE_ON_RESUME` lists what may
change (more epochs, another worker count where DeepSpeed can load the checkpoint, resources,
checkpoint retention).

**The lease** (``lease.json``): a driver that writes a run holds it, heartbeating every
:data:`LEASE_HEARTBEAT_S` seconds. A second driver is refused, naming the holder. A lease whose
heartbeat is older than :data:`LEASE_TTL_S` seconds, or whose holder is a dead process on this
host, is taken over with a message. Both the first write and every later one are conditional (S3:
``If-None-Match: *`` and ``If-Match: <etag>``; local disk: compare-and-swap under an exclusive
``flock``), so two drivers can never both win.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cliplung import storage
from cliplung.config import Config, config_from_dict, dump_config
from cliplung.model.errors import CheckpointError

__all__ = [
    "LEASE_HEARTBEAT_S",
    "LEASE_TTL_S",
    "MAY_CHANGE_ON_RESUME",
    "CheckpointChoice",
    "CheckpointError",
    "CheckpointInfo",
    "Run",
    "RunError",
    "RunLease",
    "config_differences",
    "find_checkpoint",
    "store_identity",
]

log = logging.getLogger(__name__)

RUN_RECORD = "run.json"
CONFIG_FILE = "config.yaml"
SPLITS_FILE = "splits.json"
LEASE_FILE = "lease.json"
DIVERGENCE_FILE = "divergence.json"
MODEL_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.json"
CHECKPOINT_PREFIX = "epoch_"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"

LEASE_TTL_S = 60.0
"""A lease whose last heartbeat is older than this is considered abandoned and may be taken over."""
LEASE_HEARTBEAT_S = 10.0
"""How often the holder renews its lease."""
RELEASE_ATTEMPTS = 3
"""Tries to give a lease back on transient storage errors (0.5 s and 1 s apart); taking it uses
:data:`cliplung.storage.RETRY_ATTEMPTS`."""

MAY_CHANGE_ON_RESUME: tuple[str, ...] = (
    "name",
    "preset",
    "storage",
    "metrics",
    "tune",
    "data.store",  # the same store (by identity) may be read from another place
    "train.epochs",
    "train.workers",
    "train.cpus_per_worker",
    "train.gpus_per_worker",
    "train.max_failures",
    "train.keep_checkpoints",
    "train.debug_fail_at_step",
)
"""Config fields (or whole sections) a training run may change between starts. Everything else
defines the experiment: the store's preprocessing, the split, the model and the optimisation."""


class RunError(ValueError):
    """A run cannot be started or read as asked: another store or config than it was started
    with, or a lease held by another driver."""


# --------------------------------------------------------------------------- store identity


def store_identity(store) -> dict[str, Any]:
    """What makes a store *this* store: its creation time, its row count and a SHA-256 of its
    ``patient_id`` and ``fold`` arrays (which fix every split). Its path is informational."""
    meta = store.read_rows(0, store.num_nodules, fields=("patient_id", "fold"))
    digest = hashlib.sha256()
    patients = np.asarray(meta["patient_id"]).astype(str).tolist()
    for patient, fold in zip(patients, meta["fold"].tolist(), strict=True):
        digest.update(f"{patient}\t{int(fold)}\n".encode())
    return {
        "path": store.path,
        "created": store.attrs.get("created"),
        "num_nodules": int(store.num_nodules),
        "patients_folds_sha256": digest.hexdigest(),
    }


def _same_store(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [
        f"store {key}: run has {recorded.get(key)!r}, now {current.get(key)!r}"
        for key in ("created", "num_nodules", "patients_folds_sha256")
        if recorded.get(key) != current.get(key)
    ]


# --------------------------------------------------------------------------- config comparison


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def config_differences(
    recorded: dict[str, Any], current: dict[str, Any], may_change: tuple[str, ...]
) -> list[str]:
    """``field: was X, now Y`` for every field that differs and is not in ``may_change`` (a field
    name or a whole section)."""

    def allowed(key: str) -> bool:
        return any(key == m or key.startswith(f"{m}.") for m in may_change)

    a, b = _flatten(recorded), _flatten(current)
    return [
        f"{key}: was {a.get(key)!r}, now {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if not allowed(key) and a.get(key) != b.get(key)
    ]


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class CheckpointInfo:
    """One complete checkpoint of a run."""

    location: str
    """Local path or ``s3://`` URL of the checkpoint directory."""
    epoch: int | None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        """Location of its inference export."""
        return storage.join(self.location, MODEL_FILE)


def _metric_value(info: CheckpointInfo, metric: str) -> float | None:
    value = info.metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def best_of(checkpoints: list[CheckpointInfo], metric: str, mode: str) -> CheckpointInfo | None:
    """The checkpoint with the best finite ``metric`` (``mode`` max or min); ties go to the later
    epoch. None when no checkpoint records a finite value."""
    scored = [(c, v) for c in checkpoints if (v := _metric_value(c, metric)) is not None]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda cv: (sign * cv[1], cv[0].epoch if cv[0].epoch is not None else -1))[0]


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Run:
    """The run ``name`` under ``storage`` (a local directory or ``s3://bucket/prefix``)."""

    storage: str
    name: str
    endpoint: str | None = None

    @classmethod
    def of(cls, config: Config) -> Run:
        """The run a config trains: ``(config.storage.path, config.name)``."""
        return cls(config.storage.path, config.name, config.storage.endpoint)

    @classmethod
    def at(cls, location: str, endpoint: str | None = None) -> Run:
        """The run whose directory is ``location``."""
        loc = storage.parse_location(location)
        parent, _, name = loc.url.rstrip("/").rpartition("/")
        return cls(parent, name, endpoint)

    # ---------------------------------------------------------------- places

    @property
    def location(self) -> str:
        """The run directory: a local absolute path or an ``s3://`` URL."""
        return storage.parse_location(storage.join(self.storage, self.name)).url

    def path(self, *parts: str) -> str:
        return storage.join(self.location, *parts)

    def pyarrow(self) -> tuple[Any, str]:
        """(pyarrow filesystem, path of the run *storage*) as Ray Train's ``RunConfig`` takes them."""
        return storage.pyarrow_filesystem(self.storage, endpoint=self.endpoint)

    def _fs(self):
        return storage.fsspec_filesystem(self.location, self.endpoint)

    def _fs_path(self, *parts: str) -> str:
        return storage.parse_location(self.path(*parts)).path

    def exists(self) -> bool:
        """True when anything of the run exists (its record, or a bare folder of checkpoints)."""
        return storage.exists(self.location, self.endpoint)

    def has(self, name: str) -> bool:
        return storage.exists(self.path(name), self.endpoint)

    # ---------------------------------------------------------------- small files

    def read_text(self, name: str) -> str | None:
        try:
            return storage.read_text(self.path(name), self.endpoint)
        except FileNotFoundError:
            return None

    def read_json(self, name: str) -> Any:
        text = self.read_text(name)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise RunError(f"{self.path(name)}: not valid JSON ({exc})") from None

    def write_text(self, name: str, text: str) -> None:
        """Write one small text file (see :meth:`write_bytes`)."""
        self.write_bytes(name, text.encode("utf-8"))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write one small file: one PUT on S3, write-then-rename locally (never half-written)."""
        target = self.path(name)
        if storage.is_s3(target):
            self._fs().pipe_file(storage.parse_location(target).path, data)
            return
        os.makedirs(self.location, exist_ok=True)
        tmp = os.path.join(self.location, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, target)

    def read_config(self) -> Config | None:
        """The config the run was created with (``config.yaml``), or None."""
        import yaml

        text = self.read_text(CONFIG_FILE)
        return None if text is None else config_from_dict(yaml.safe_load(text))

    def read_splits(self) -> dict[str, Any] | None:
        return self.read_json(SPLITS_FILE)

    def record(self) -> dict[str, Any] | None:
        return self.read_json(RUN_RECORD)

    # ---------------------------------------------------------------- the run record

    def start(
        self,
        config: Config,
        *,
        kind: str,
        store=None,
        splits: dict[str, Any] | None = None,
        may_change: tuple[str, ...] = MAY_CHANGE_ON_RESUME,
    ) -> bool:
        """Record a new run, or check that this start continues the recorded one.

        Returns True when the run already existed (a resume). Raises :class:`RunError`, before
        anything is written, when the store or a defining config field differs from the record.
        ``config.yaml`` and ``splits.json`` are written once, with the record.
        """
        identity = store_identity(store) if store is not None else None
        current = _defining(config)
        recorded = self.record()
        if recorded is not None:
            problems = []
            if recorded.get("kind") != kind:
                problems.append(f"it is a {recorded.get('kind')} run, this is a {kind}")
            if identity is not None and recorded.get("store"):
                problems += _same_store(recorded["store"], identity)
            problems += config_differences(recorded.get("config", {}), current, may_change)
            if problems:
                raise RunError(
                    f"{self.location} was started with another "
                    f"{'store or config' if identity else 'config'}; a run continues only what it "
                    "started. Differences: " + "; ".join(problems) + ". Use a new --name for a new run."
                )
            return True
        if splits is not None:
            self.write_text(SPLITS_FILE, json.dumps(splits))
        self.write_text(CONFIG_FILE, dump_config(config))
        self.write_text(
            RUN_RECORD,
            json.dumps(
                {
                    "kind": kind,
                    "name": self.name,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "store": identity,
                    "config": current,
                },
                indent=2,
            )
            + "\n",
        )
        return False

    # ---------------------------------------------------------------- checkpoints

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every complete checkpoint, oldest first: from Ray Train's record of the run when there
        is one, else the ``epoch_*`` folders that hold both ``model.pt`` and ``train_state.json``."""
        if self.has(RAY_SNAPSHOT):
            return self._registered_checkpoints()
        return self._folder_checkpoints()

    def _registered_checkpoints(self) -> list[CheckpointInfo]:
        import ray.train

        fs, path = storage.pyarrow_filesystem(self.location, endpoint=self.endpoint)
        try:
            result = ray.train.Result.from_path(path, storage_filesystem=fs)
        except (RuntimeError, OSError, ValueError) as exc:
            raise RunError(f"{self.location}: Ray Train's record of the run is unreadable ({exc})") from None
        prefix = "s3://" if storage.is_s3(self.location) else ""
        out = [
            CheckpointInfo(
                location=f"{prefix}{checkpoint.path}",
                epoch=_int_or_none(metrics.get("epoch")),
                metrics=dict(metrics),
            )
            for checkpoint, metrics in (result.best_checkpoints or [])
        ]
        return sorted(out, key=lambda c: (c.epoch is None, c.epoch or 0, c.location))

    def _folder_checkpoints(self) -> list[CheckpointInfo]:
        fs = self._fs()
        root = self._fs_path()
        prefix = "s3://" if storage.is_s3(self.location) else ""
        out = []
        for path in sorted(fs.glob(f"{root}/{CHECKPOINT_PREFIX}*")):
            # A checkpoint still being copied lacks one of the two; it is not complete.
            if not (fs.exists(f"{path}/{MODEL_FILE}") and fs.exists(f"{path}/{TRAIN_STATE_FILE}")):
                continue
            try:
                state = json.loads(fs.cat_file(f"{path}/{TRAIN_STATE_FILE}"))
            except (ValueError, OSError) as exc:
                raise CheckpointError(f"{prefix}{path}/{TRAIN_STATE_FILE}: unreadable ({exc})") from None
            out.append(
                CheckpointInfo(
                    location=f"{prefix}{path}",
                    epoch=_int_or_none(state.get("epoch")),
                    metrics=dict(state.get("metrics") or {}),
                )
            )
        return sorted(out, key=lambda c: (c.epoch is None, c.epoch or 0, c.location))

    def checkpoint_state(self, checkpoint: CheckpointInfo) -> dict[str, Any]:
        """A checkpoint's ``train_state.json`` (epoch, step, metrics, format)."""
        location = storage.join(checkpoint.location, TRAIN_STATE_FILE)
        try:
            return json.loads(storage.read_text(location, self.endpoint))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{location}: unreadable ({exc})") from None

    def latest_checkpoint(self) -> CheckpointInfo | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def selection_rule(self) -> tuple[str, str]:
        """(metric, mode) the run selects its best checkpoint by (its ``train.checkpoint_*``)."""
        config = self.read_config()
        t = (config or Config()).train
        return t.checkpoint_metric, t.checkpoint_mode

    def best_checkpoint(self, metric: str | None = None, mode: str | None = None) -> CheckpointInfo:
        """The checkpoint with the best validation metric (default: the run's own rule)."""
        run_metric, run_mode = self.selection_rule()
        metric, mode = metric or run_metric, mode or run_mode
        if metric.split("/", 1)[0].startswith("test"):
            raise CheckpointError(
                f"train.checkpoint_metric: {metric!r} is a test metric; select on validation"
            )
        found = self.checkpoints()
        if not found:
            raise CheckpointError(
                f"{self.location}: no complete checkpoint (has the run finished an epoch? a copied "
                f"run needs {CHECKPOINT_PREFIX}NNNN/ folders with {MODEL_FILE} and {TRAIN_STATE_FILE})"
            )
        best = best_of(found, metric, mode)
        if best is None:
            raise CheckpointError(
                f"{self.location}: no checkpoint records a finite {metric!r}; cannot select one"
            )
        return best

    # ---------------------------------------------------------------- lease

    def lease(self, *, purpose: str) -> RunLease:
        return RunLease(self, purpose=purpose)


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _defining(config: Config) -> dict[str, Any]:
    data = config.public_dict()
    return {k: v for k, v in data.items() if k in ("prepare", "data", "model", "train", "tune")}


# --------------------------------------------------------------------------- finding a checkpoint


@dataclass(frozen=True)
class CheckpointChoice:
    """Which ``model.pt`` a command uses, and why."""

    model_path: str
    run: Run | None = None
    """The run the checkpoint belongs to, when known (its ``splits.json`` proves isolation)."""
    epoch: int | None = None
    metric: str | None = None
    mode: str | None = None
    value: float | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "run": self.run.location if self.run else None,
            "epoch": self.epoch,
            "metric": self.metric,
            "mode": self.mode,
            "value": self.value,
            "candidates": self.candidates,
        }


def _choose_best(run: Run) -> CheckpointChoice:
    metric, mode = run.selection_rule()
    best = run.best_checkpoint(metric, mode)
    return CheckpointChoice(
        model_path=best.model,
        run=run,
        epoch=best.epoch,
        metric=metric,
        mode=mode,
        value=_metric_value(best, metric),
        candidates=[
            {"checkpoint": c.location, "epoch": c.epoch, "value": _metric_value(c, metric)}
            for c in run.checkpoints()
        ],
    )


def find_checkpoint(
    target: str, *, storage_path: str | None = None, endpoint: str | None = None
) -> CheckpointChoice:
    """The ``model.pt`` meant by ``target``.

    With ``storage_path``: ``target`` is a run name, and the run's best checkpoint by its validation
    metric is chosen. Without: ``target`` is a ``model.pt``, a checkpoint directory holding one, or a
    run directory (whose best checkpoint is chosen); local or ``s3://``.
    """
    if storage_path is not None:
        if not target or "/" in target:
            raise CheckpointError(f"--run: expected a run name (no '/'), got {target!r}")
        run = Run(storage_path, target, endpoint)
        if not run.exists():
            raise CheckpointError(f"{run.location}: no such run (check --run and --storage)")
        return _choose_best(run)
    fs = storage.fsspec_filesystem(target, endpoint)
    path = storage.parse_location(target).path
    if not fs.exists(path):
        raise CheckpointError(f"{target}: no such checkpoint file or directory")
    if fs.isfile(path):
        return CheckpointChoice(model_path=target, run=_run_of_checkpoint(target, endpoint))
    if fs.exists(f"{path}/{MODEL_FILE}"):
        return CheckpointChoice(
            model_path=storage.join(target, MODEL_FILE), run=_run_of_checkpoint(target, endpoint)
        )
    run = Run.at(target, endpoint)
    if run.has(RAY_SNAPSHOT) or fs.glob(f"{path}/{CHECKPOINT_PREFIX}*"):
        return _choose_best(run)
    raise CheckpointError(
        f"{target}: neither a {MODEL_FILE}, a checkpoint directory holding one, nor a run directory "
        f"with {CHECKPOINT_PREFIX}NNNN/ checkpoints"
    )


def _run_of_checkpoint(location: str, endpoint: str | None) -> Run | None:
    """The run a checkpoint (directory or file inside it) belongs to, if it has a split record."""
    loc = storage.parse_location(location).url.rstrip("/")
    if loc.endswith(f"/{MODEL_FILE}"):
        loc = loc.rsplit("/", 1)[0]
    parent = loc.rsplit("/", 1)[0]
    run = Run.at(parent, endpoint)
    return run if run.has(SPLITS_FILE) else None


# --------------------------------------------------------------------------- the lease


def _holder(purpose: str) -> dict[str, Any]:
    started = time.time()
    with contextlib.suppress(Exception):
        import psutil

        started = psutil.Process(os.getpid()).create_time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_started": started,
        "purpose": purpose,
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
        "acquired": time.time(),
        "heartbeat": time.time(),
        "token": uuid.uuid4().hex,
    }


def _describe(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("acquired", 0)))
    age = time.time() - float(holder.get("heartbeat", 0))
    return (
        f"host {holder.get('host')}, pid {holder.get('pid')}, {holder.get('purpose')} since {started} "
        f"(last heartbeat {age:.0f} s ago)"
    )


_HELD_HERE: set[str] = set()
"""Tokens of the leases this process holds now (a lease of this process that is not among them
was left behind by an earlier run in this process whose release could not reach the storage)."""


def _holder_is_dead(holder: dict[str, Any]) -> bool:
    """True for a holder on this host whose process is gone (or whose pid was reused), or a lease
    this very process left behind."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = int(holder.get("pid", -1))
    if pid == os.getpid():
        return holder.get("token") not in _HELD_HERE
    try:
        import psutil

        proc = psutil.Process(pid)
        recorded = holder.get("process_started")
        return recorded is not None and abs(proc.create_time() - float(recorded)) > 1.0
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    except Exception:  # psutil.NoSuchProcess and friends
        return True


class _LocalLeaseFile:
    """Compare-and-swap on a local file: every read-compare-write runs under an exclusive flock
    of a sibling lock file, so two processes can never both see the same version and both write."""

    def __init__(self, run: Run) -> None:
        self.dir = storage.parse_location(run.location).path
        self.path = os.path.join(self.dir, LEASE_FILE)
        self.lock = os.path.join(self.dir, f".{LEASE_FILE}.lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.dir, exist_ok=True)
        with open(self.lock, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read(self) -> tuple[dict[str, Any], str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(data)
        except ValueError:
            holder = {}
        return holder, hashlib.sha256(data).hexdigest()

    def _write(self, holder: dict[str, Any]) -> str:
        data = json.dumps(holder).encode()
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)
        return hashlib.sha256(data).hexdigest()

    def read(self) -> tuple[dict[str, Any], str] | None:
        with self._locked():
            return self._read()

    def put(self, holder: dict[str, Any], version: str | None) -> str | None:
        """Write ``holder`` if the current version is ``version`` (None: if there is no lease)."""
        with self._locked():
            current = self._read()
            if (current[1] if current else None) != version:
                return None
            return self._write(holder)

    def delete(self, version: str) -> None:
        with self._locked():
            current = self._read()
            if current and current[1] == version:
                os.remove(self.path)


class _S3LeaseFile:
    """Compare-and-swap on an S3 object with conditional writes (``If-None-Match: *`` to create,
    ``If-Match: <etag>`` to replace), which AWS S3 and S3-compatible stores evaluate atomically."""

    def __init__(self, run: Run) -> None:
        loc = storage.parse_location(run.path(LEASE_FILE))
        self.bucket, self.key, self.url = loc.bucket, loc.key, loc.url
        self.fs = storage.fsspec_filesystem(loc.url, run.endpoint)

    def read(self) -> tuple[dict[str, Any], str] | None:
        try:
            response = self.fs.call_s3("get_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return None
        data = _read_body(self.fs, response["Body"])
        try:
            holder = json.loads(data)
        except ValueError:
            holder = {}
        return holder, response["ETag"]

    def put(self, holder: dict[str, Any], version: str | None) -> str | None:
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            response = self.fs.call_s3(
                "put_object", Bucket=self.bucket, Key=self.key, Body=json.dumps(holder).encode(), **condition
            )
        except Exception as exc:
            if _is_precondition_failure(exc):
                return None
            raise
        return response["ETag"]

    def delete(self, version: str) -> None:
        current = self.read()
        if current and current[1] == version:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)


def _read_body(fs, body) -> bytes:
    """Read an aiobotocore streaming body (what ``call_s3("get_object")`` returns) on s3fs's loop."""
    from fsspec.asyn import sync

    return sync(fs.loop, body.read)


def _is_precondition_failure(exc: BaseException) -> bool:
    # s3fs turns botocore's ClientError into OSError subclasses; the status or code survives in
    # the message or the chained exception.
    for e in (exc, exc.__cause__, exc.__context__):
        if e is None:
            continue
        text = f"{type(e).__name__} {e}"
        if "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text:
            return True
        response = getattr(e, "response", None) or {}
        if str(response.get("Error", {}).get("Code")) in ("PreconditionFailed", "412"):
            return True
    return False


class RunLease:
    """The right to write a run, held by one driver at a time; a context manager.

    ``with run.lease(purpose="train"): ...`` acquires it (or raises :class:`RunError` naming the
    holder), renews it in a background thread and gives it back on exit, also on an exception.
    """

    def __init__(
        self, run: Run, *, purpose: str, ttl_s: float = LEASE_TTL_S, heartbeat_s: float = LEASE_HEARTBEAT_S
    ):
        self.run = run
        self.purpose = purpose
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.file = _S3LeaseFile(run) if storage.is_s3(run.location) else _LocalLeaseFile(run)
        self.holder: dict[str, Any] | None = None
        self.version: str | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _retried(self, what: str, fn, attempts: int | None = None):
        """``fn()`` retried on transient storage errors (:func:`cliplung.storage.retry`): taking and
        giving back the lease rides out an object store that is restarting, as every other read
        and write of a run does. A write whose answer was lost and is retried finds its own
        holder there (a failed condition): :meth:`acquire` and :meth:`renew` recognise it by the
        token."""
        return storage.retry(fn, what=f"lease of {self.run.location}: {what}", attempts=attempts)

    def acquire(self) -> RunLease:
        mine = _holder(self.purpose)
        for _attempt in range(5):
            current = self._retried("read", self.file.read)
            if current is None:
                version = self._retried("create", lambda: self.file.put(mine, None))
            else:
                holder, etag = current
                if holder.get("token") == mine["token"]:
                    version = etag
                elif _holder_is_dead(holder) or time.time() - float(holder.get("heartbeat", 0)) > self.ttl_s:
                    version = self._retried("take over", lambda etag=etag: self.file.put(mine, etag))
                    if version is not None:
                        print(
                            f"taking over the lease of {self.run.location} from a driver that is gone "
                            f"({_describe(holder)})",
                            file=sys.stderr,
                            flush=True,
                        )
                else:
                    raise RunError(
                        f"{self.run.location} is being written by another driver ({_describe(holder)}); "
                        f"wait for it to finish, stop it, or use another --name. A lease without a "
                        f"heartbeat for {self.ttl_s:.0f} s is taken over automatically."
                    )
            if version is not None:
                self.holder, self.version = mine, version
                _HELD_HERE.add(mine["token"])
                self._start_heartbeat()
                return self
        raise RunError(
            f"{self.run.location}: could not take the run's lease (other drivers keep racing for it)"
        )

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="cliplung-run-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except Exception as exc:  # a storage hiccup: try again at the next beat
                log.warning("lease of %s: heartbeat failed (%s)", self.run.location, exc)

    def renew(self) -> None:
        """Renew the heartbeat now; sets :attr:`lost` if another driver took the lease."""
        with self._mutex:
            if self.holder is None or self.lost.is_set():
                return
            updated = {**self.holder, "heartbeat": time.time()}
            version = self.file.put(updated, self.version)
            if version is None:
                # Our last write may have landed with its answer lost (then the stored version is
                # ours, under a version we never saw): only another holder's token means lost.
                current = self.file.read()
                if current is not None and current[0].get("token") == self.holder["token"]:
                    self.holder, self.version = current[0], current[1]
                    return
                self.lost.set()
                log.error(
                    "lease of %s was taken over by another driver; this driver should stop", self.run.location
                )
                return
            self.holder, self.version = updated, version

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
        with self._mutex:
            if self.version is not None and not self.lost.is_set():
                version = self.version
                try:
                    # A few tries only: a driver that ends while the store is down should not wait
                    # out the whole backoff; the lease it leaves goes stale after LEASE_TTL_S.
                    self._retried("give back", lambda: self.file.delete(version), attempts=RELEASE_ATTEMPTS)
                except Exception as exc:  # storage unreachable: the lease stays until it goes stale
                    log.warning("lease of %s: could not give it back (%s)", self.run.location, exc)
            if self.holder is not None:
                _HELD_HERE.discard(self.holder["token"])
            self.holder = self.version = None

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
