"""The ``cliplung`` command. Each subcommand parses, builds a config, calls one function, exits.

Flags and ``--set`` become config fields through :mod:`cliplung.arguments` (one override path),
and every error is turned into an exit code there (0 success, 1 the work failed, 2 bad input
naming the file or field, 130 interrupted).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cliplung.arguments import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    add_config_args,
    config_from_args,
    environment_overrides,
    exit_code,
)
from cliplung.bench import GPU_SECTIONS
from cliplung.config import ConfigError, load_config
from cliplung.data.store import StoreError
from cliplung.evaluate.cli import register as register_evaluate
from cliplung.tune.cli import register as register_tune

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "build_parser", "main"]


# --------------------------------------------------------------------------- prepare / inspect


PREPARE_FLAGS = {
    "source": "prepare.source",
    "lidc_dir": "prepare.lidc_dir",
    "patch_size": "prepare.patch_size",
    "spacing": "prepare.spacing_mm",
    "min_readers": "prepare.min_readers",
    "folds": "prepare.folds",
    "seed": "prepare.seed",
    "limit": "prepare.limit",
    "workers": "prepare.workers",
    "on_error": "prepare.on_error",
}
TRAIN_FLAGS = {
    "data": "data.store",
    "storage": "storage.path",
    "storage_endpoint": "storage.endpoint",
    "name": "name",
    "workers": "train.workers",
    "gpus_per_worker": "train.gpus_per_worker",
    "epochs": "train.epochs",
}


def cmd_prepare(args: argparse.Namespace) -> int:
    from cliplung.data.prepare import prepare_store

    extra = {}
    if args.hu_window:
        try:
            lo, hi = (float(v) for v in args.hu_window.split(","))
        except ValueError:
            raise ConfigError(f"prepare.hu_window: expected LOW,HIGH, got {args.hu_window!r}") from None
        extra["prepare.hu_window"] = [lo, hi]
    config = config_from_args(args, PREPARE_FLAGS, extra)
    if config.prepare.source == "lidc" and not config.prepare.lidc_dir:
        raise ConfigError("prepare.lidc_dir: --lidc-dir is required with --source lidc")
    summary = prepare_store(
        config,
        args.out,
        overwrite=args.overwrite,
        resume=args.resume,
        endpoint=args.storage_endpoint,
        address=args.address,
    )
    print(summary.format())
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from cliplung.data.inspect import inspect_store

    text, ok = inspect_store(args.store, png_out=args.png, endpoint=args.storage_endpoint, verify=args.verify)
    print(text)
    return EXIT_OK if ok else EXIT_BAD_INPUT


# --------------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    from cliplung.train.trainer import train

    config = config_from_args(args, TRAIN_FLAGS)
    print(
        f"training {config.name}: preset={config.preset} method={config.model.method} "
        f"workers={config.train.workers} epochs={config.train.epochs} data={config.data.store} "
        f"storage={config.storage.path}",
        flush=True,
    )
    summary = train(config, address=args.address)
    print(summary.format())
    return EXIT_OK


def _add_train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--data", help="nodule store (directory or s3://bucket/prefix)")
    p.add_argument("--storage", help="run storage (directory or s3://bucket/prefix)")
    p.add_argument("--storage-endpoint", help="S3 endpoint URL (MinIO etc.); default AWS_ENDPOINT_URL")
    p.add_argument("--name", help="run name; the same name and storage resume the run")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (0: CPU)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS, else an embedded Ray)")


# --------------------------------------------------------------------------- bench

DEFAULT_BENCH_STORE = "stores/phantom"


def cmd_bench(args: argparse.Namespace) -> int:
    """Every benchmark gets the flags that apply to it; a flag it cannot use is an error."""
    store = args.data or DEFAULT_BENCH_STORE
    batch = {} if args.batch is None else {"batch": args.batch}  # else each benchmark's own default
    if args.what == "model":
        from cliplung.bench.model import bench_model

        bench_model(args.preset, **batch, device=args.device, steps=args.steps, as_json=args.json)
    elif args.what == "ingest":
        from cliplung.bench.ingest import bench_ingest

        # Without --data: temporary random stores at 16^3 and 32^3.
        bench_ingest(args.data, **batch, epochs=args.steps, as_json=args.json)
    elif args.what == "tune":
        from cliplung.bench.tune import bench_tune

        bench_tune(store, budget_epochs=args.budget_epochs, as_json=args.json)
    elif args.what == "predict":
        from cliplung.bench.predict import bench_predict

        # Without --data: a temporary random store (the bench measures the model, not the data).
        bench_predict(args.preset, **batch, steps=args.steps, data=args.data, as_json=args.json)
    elif args.what == "gpu":
        from cliplung.bench.gpu import bench_gpu

        bench_gpu(dry_run=args.dry_run, as_json=args.json, skip=tuple(args.skip))
    elif args.what == "train":
        from cliplung.bench.train import bench_train

        bench_train(store, preset=args.preset, epochs=args.steps, as_json=args.json, model=args.model)
    else:
        raise ConfigError(f"bench: unknown benchmark {args.what!r}")
    return EXIT_OK


# --------------------------------------------------------------------------- quickstart


def cmd_quickstart(args: argparse.Namespace) -> int:
    from cliplung.data.prepare import prepare_store
    from cliplung.data.store import NoduleStore, describe_target
    from cliplung.evaluate.evaluate import evaluate
    from cliplung.train.trainer import train

    config = load_config(
        "debug",
        [*args.set, *environment_overrides()],
        values={
            "data.store": args.store,
            "storage.path": args.storage,
            "name": "quickstart",
            "train.epochs": args.epochs,
        },
    )
    start = time.perf_counter()
    # Quickstart never replaces anything: it reuses a store, finishes its own interrupted build,
    # or builds where nothing is; whatever else is at the path is an error that says what it is.
    state = describe_target(config.data.store)
    if state.kind == "store":
        NoduleStore.open(config.data.store)
        print(f"[1/3] phantom store {config.data.store} exists, reusing it", flush=True)
    elif state.kind in ("absent", "empty", "builds"):
        print(
            f"[1/3] building the phantom store at {config.data.store} (simulated intensities on real "
            "LIDC-IDRI contours and ratings)",
            flush=True,
        )
        print(prepare_store(config, config.data.store, resume=True).format(), flush=True)
    else:
        NoduleStore.open(config.data.store)  # raises, naming what is there and what to do
        raise StoreError(f"quickstart: {config.data.store} is not a phantom store it can use")
    print(
        f"[2/3] training {config.name}: debug preset, {config.train.workers} CPU workers, "
        f"{config.train.epochs} epochs",
        flush=True,
    )
    print(train(config).format(), flush=True)
    print(f"[3/3] evaluating the best checkpoint (chosen on validation) on test fold {config.data.test_fold}")
    result = evaluate(config.name, config.data.store, storage=config.storage.path, out_dir=args.report)
    keys = ("accuracy", "macro_f1", "auc", "ece")
    print(
        "test metrics (phantom data, not LIDC results): "
        + ", ".join(f"{k}={result[k]:.4f}" for k in keys if isinstance(result.get(k), float))
    )
    print(f"report: {Path(args.report).resolve() / 'report.html'}")
    print(f"quickstart finished in {time.perf_counter() - start:.0f}s")
    return EXIT_OK


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cliplung", description="CLIP-Lung nodule classifiers on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build a nodule store from LIDC-IDRI DICOM or the phantom source")
    add_config_args(p)
    p.add_argument("--source", choices=["phantom", "lidc"])
    p.add_argument("--lidc-dir", help="LIDC-IDRI DICOM root (with --source lidc)")
    p.add_argument("--out", required=True, help="store path: directory or s3://bucket/prefix")
    p.add_argument("--patch-size", type=int)
    p.add_argument("--spacing", type=float, help="isotropic spacing in mm")
    p.add_argument("--hu-window", help="LOW,HIGH in Hounsfield units")
    p.add_argument("--min-readers", type=int)
    p.add_argument("--folds", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--limit", type=int, help="at most this many scans")
    p.add_argument("--workers", type=int, help="parallel processes")
    p.add_argument("--on-error", choices=["skip", "fail"])
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a nodule store (only one this code wrote; the old version stays readable until "
        "the new one is committed)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted prepare of the same arguments"
    )
    p.add_argument(
        "--address", help="Ray cluster to run the scans on (default RAY_ADDRESS; else local processes)"
    )
    p.add_argument("--storage-endpoint", help="S3 endpoint URL; default AWS_ENDPOINT_URL")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("inspect", help="print a store's schema and counts; write a PNG montage")
    p.add_argument("store")
    p.add_argument("--png", help="montage output (default: none)")
    p.add_argument(
        "--verify", action="store_true", help="re-read every object and check its size and SHA-256"
    )
    p.add_argument("--storage-endpoint")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="train on Ray (embedded or a cluster); resumes a run with the same name")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    register_tune(sub)
    register_evaluate(sub)

    p = sub.add_parser("bench", help="benchmarks: model, ingest, train, tune, predict, gpu")
    p.add_argument("what", choices=["model", "ingest", "train", "tune", "predict", "gpu"])
    p.add_argument("--dry-run", action="store_true", help="gpu: the same code at tiny sizes on the CPU")
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=GPU_SECTIONS,
        help="gpu: a section not to run (repeatable)",
    )
    p.add_argument("--preset", default="debug", choices=["debug", "paper"])
    p.add_argument("--batch", type=int, help="batch size (default: each benchmark's own)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--steps", type=int, default=5, help="timed steps (model, predict) or epochs (ingest, train)"
    )
    p.add_argument(
        "--data",
        help=f"store (train, tune: default {DEFAULT_BENCH_STORE}; ingest: random 16^3 and 32^3 stores; "
        "predict: a random store)",
    )
    p.add_argument("--budget-epochs", type=int, default=16, help="tune: total epochs per search")
    p.add_argument(
        "--model",
        default="preset",
        choices=["preset", "null"],
        help="train: the preset's model, or null (the data path alone: samples/s, data wait)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("quickstart", help="phantom store -> debug training on 2 CPU workers -> metrics")
    p.add_argument("--store", default="stores/phantom")
    p.add_argument("--storage", default="runs")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--report", default="reports/quickstart", help="evaluation report directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as exc:
        known = exit_code(exc)
        if known is None:
            raise
        code, message = known
        print(f"cliplung {args.command}: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
