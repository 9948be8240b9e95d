"""``cliplung tune``: hyperparameter search where every trial is a full Ray Train run.

    cliplung tune --config debug --data stores/phantom --storage runs --name search1 \\
        --trials 16 --max-concurrent 2 --epochs 10 --resources-per-trial workers=1
    cliplung tune --config debug --data stores/phantom --storage runs --name search1 --resume
    optuna-dashboard sqlite:///runs/search1/optuna.db --host 127.0.0.1 --port 8081

    # A shared study in PostgreSQL, the password kept off the command line:
    export OPTUNA_STORAGE=postgresql+psycopg://optuna@db.example:5432/optuna PGPASSWORD=...
    cliplung tune --config debug --data s3://bucket/stores/phantom --storage s3://bucket/runs --name s2

Registered on the main parser by :func:`register`; bad input raises
:class:`~cliplung.config.ConfigError`, which ``cliplung``'s ``main`` turns into exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from cliplung.arguments import add_config_args, config_from_args
from cliplung.config import Config, ConfigError

__all__ = ["RESOURCE_KEYS", "cmd_tune", "parse_resources", "register", "tune_config"]

RESOURCE_KEYS = ("workers", "cpus_per_worker", "gpus_per_worker")
"""Keys of ``--resources-per-trial``; each sets the ``train`` field of the same name."""

_FLAGS = {
    "data": "data.store",
    "storage": "storage.path",
    "storage_endpoint": "storage.endpoint",
    "name": "name",
    "trials": "tune.trials",
    "max_concurrent": "tune.max_concurrent",
    "epochs": "train.epochs",
    "metric": "tune.metric",
    "mode": "tune.mode",
    "study_db": "tune.study_db",
}


def parse_resources(text: str) -> list[str]:
    """``workers=1,gpus_per_worker=0.25`` as ``train.*`` ``--set`` overrides (values parsed as YAML
    numbers and checked by the config)."""
    overrides = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise ConfigError(f"--resources-per-trial: expected KEY=VALUE, got {item!r}")
        if key not in RESOURCE_KEYS:
            raise ConfigError(
                f"--resources-per-trial: unknown key {key!r}; use {', '.join(RESOURCE_KEYS)} "
                "(e.g. workers=1,gpus_per_worker=0.25)"
            )
        overrides.append(f"train.{key}={value.strip()}")
    if not overrides:
        raise ConfigError(f"--resources-per-trial: nothing given in {text!r}")
    return overrides


def _has_password(url: str) -> bool:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).password is not None
    except Exception:
        return False


def tune_config(args: argparse.Namespace) -> Config:
    """Preset/file, then the explicit flags, then ``--resources-per-trial``, then ``--set``."""
    resources = parse_resources(args.resources_per_trial) if args.resources_per_trial else []
    args = argparse.Namespace(**{**vars(args), "set": [*resources, *(args.set or [])]})
    return config_from_args(args, _FLAGS)


def cmd_tune(args: argparse.Namespace) -> int:
    from cliplung.tune.search import tune_search

    config = tune_config(args)
    if args.study_db and _has_password(args.study_db):
        print(
            "cliplung tune: note: the --study-db password is visible to `ps` and in Ray's job list; "
            "pass the URL without it and the password in PGPASSWORD or a file named by "
            "CLIPLUNG_STUDY_DB_PASSWORD_FILE (the search records the URL without it either way)",
            file=sys.stderr,
            flush=True,
        )
    t, tc = config.train, config.tune
    gpus = f", {t.gpus_per_worker} GPU" if t.gpus_per_worker else ""
    print(
        f"{'resuming' if args.resume else 'starting'} search {config.name}: {tc.trials} trials x "
        f"{t.epochs} epochs, {tc.max_concurrent} at a time, each {t.workers} worker(s) of "
        f"{t.cpus_per_worker} CPU{gpus}; {tc.metric} ({tc.mode}), ASHA {'on' if tc.asha else 'off'}; "
        f"data={config.data.store} storage={config.storage.path}",
        flush=True,
    )
    summary = tune_search(config, resume=args.resume, address=args.address)
    print(summary.format())
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``tune`` subcommand to ``cliplung``'s subparsers."""
    p = subparsers.add_parser(
        "tune",
        help="hyperparameter search (Ray Tune + Optuna TPE + ASHA); each trial is a full training run",
        description="Search CLIP-Lung's prompt length, loss weights, learning rate and weight decay. "
        "Same --name and --storage with --resume continue an interrupted search.",
    )
    add_config_args(p)
    p.add_argument("--data", help="nodule store (directory or s3://bucket/prefix)")
    p.add_argument("--storage", help="run storage (directory or s3://bucket/prefix)")
    p.add_argument("--storage-endpoint", help="S3 endpoint URL (MinIO etc.); default AWS_ENDPOINT_URL")
    p.add_argument("--name", help="search name; with --storage it identifies the search")
    p.add_argument("--trials", type=int, help="number of trials (tune.trials)")
    p.add_argument("--max-concurrent", type=int, help="trials running at once (tune.max_concurrent)")
    p.add_argument("--epochs", type=int, help="epochs per trial (ASHA's max_t)")
    p.add_argument("--metric", help="metric to optimise (default val/macro_f1)")
    p.add_argument("--mode", choices=["max", "min"], help="maximise or minimise --metric")
    p.add_argument(
        "--study-db",
        metavar="URL",
        help="SQLAlchemy URL of the Optuna study, e.g. postgresql+psycopg://optuna@host:5432/optuna "
        "(default: $OPTUNA_STORAGE, else the SQLite file <storage>/<name>/optuna.db; s3:// storage "
        "needs a database). Keep the password out of it: PGPASSWORD, ~/.pgpass or a file named by "
        "CLIPLUNG_STUDY_DB_PASSWORD_FILE",
    )
    p.add_argument(
        "--resources-per-trial",
        metavar="SPEC",
        help="resources of each trial's training run, e.g. workers=1,gpus_per_worker=0.25 "
        f"(keys: {', '.join(RESOURCE_KEYS)})",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="insist on continuing an existing search (a search started again continues by itself)",
    )
    p.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS, else an embedded Ray)")
    p.set_defaults(func=cmd_tune)
    return p
