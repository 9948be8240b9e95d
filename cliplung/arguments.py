"""What every ``cliplung`` subcommand shares: the config arguments, flags as config fields, exit codes.

**One override path.** A subcommand's explicit flags (``--name``, ``--data``, ``--workers``...)
are config fields given as *values*: argparse has already typed them (``type=int`` and friends)
and a string flag stays a string, so ``--name 42``, ``--name yes``, ``--data "runs/a #2"`` and URLs
with colons arrive exactly as typed. Only ``--set section.field=VALUE`` parses its value as YAML
(``--set model.n_ctx=8``, ``--set train.precision=bf16``, ``--set prepare.hu_window=[-1000,400]``).
Order: the preset or YAML file, then the flags, then ``--set``, then ``CLIPLUNG_OVERRIDES``.

**Scripted runs** (:data:`OVERRIDES_ENV`): ``CLIPLUNG_OVERRIDES="prepare.limit=40; tune.trials=2"``
in the environment adds ``--set`` overrides after everything else, so a script can shrink the
documented commands without rewriting them (the README test does: see ``tests/test_readme.py``).
They are applied visibly: every run dumps the config it ran with.

**One exit-code rule** (:func:`exit_code`): 0 success; 2 bad input (a config field, a store, a
DICOM series, storage, a checkpoint, a run that was started otherwise, a prediction request),
printed as one line naming the file or field; 1 the work failed in a way the input did not cause
(e.g. a split leak found by evaluation); 130 interrupted.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from cliplung.config import Config, load_config

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "OVERRIDES_ENV",
    "add_config_args",
    "bad_input_errors",
    "config_from_args",
    "environment_overrides",
    "exit_code",
]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
OVERRIDES_ENV = "CLIPLUNG_OVERRIDES"


def environment_overrides() -> list[str]:
    """``section.field=value`` items of ``CLIPLUNG_OVERRIDES`` (separated by ``;`` or newlines)."""
    import os
    import re

    text = os.environ.get(OVERRIDES_ENV, "")
    return [item.strip() for item in re.split(r"[;\n]", text) if item.strip()]


def add_config_args(p: argparse.ArgumentParser, default: str = "debug") -> None:
    """``--config`` (a preset or a YAML/JSON file) and repeatable ``--set KEY=VALUE``."""
    p.add_argument(
        "--config", default=default, help=f"preset (debug, paper) or YAML/JSON file (default {default})"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override a config field, value parsed as YAML, e.g. model.n_ctx=8 (repeatable)",
    )


def config_from_args(
    args: argparse.Namespace, flags: Mapping[str, str], extra: Mapping[str, Any] | None = None
) -> Config:
    """The config of a subcommand: ``--config``, then the given ``flags`` (argparse attribute ->
    dotted config field; unset flags are skipped), then ``extra`` field values, then ``--set``."""
    values: dict[str, Any] = {}
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            values[key] = value
    values.update(extra or {})
    overrides = [*(getattr(args, "set", None) or []), *environment_overrides()]
    return load_config(getattr(args, "config", None) or "debug", overrides, values=values)


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """Every error type that means "the input is wrong" (exit 2). Imported lazily: some live in
    modules that pull in torch."""
    from cliplung.config import ConfigError
    from cliplung.data.dicom import DicomError
    from cliplung.data.prepare import PrepareError
    from cliplung.data.store import StoreError
    from cliplung.evaluate.checkpoints import CheckpointError
    from cliplung.evaluate.predict import PredictError
    from cliplung.runs import RunError
    from cliplung.storage import StorageError

    return (
        ConfigError,
        StoreError,
        DicomError,
        StorageError,
        PrepareError,
        CheckpointError,
        PredictError,
        RunError,
    )


def exit_code(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for an error a command should report without a traceback;
    None for anything else (a bug: let the traceback through)."""
    from cliplung.evaluate.splits import SplitLeakError
    from cliplung.train.step import DivergedError

    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(exc, SplitLeakError):
        return EXIT_FAILED, f"split leak: {exc}"
    if isinstance(exc, DivergedError):
        return EXIT_FAILED, str(exc)
    if isinstance(exc, bad_input_errors()):
        return EXIT_BAD_INPUT, f"error: {exc}"
    return None
