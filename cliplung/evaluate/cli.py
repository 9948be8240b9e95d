"""Subcommands ``evaluate``, ``cv``, ``compare`` and ``predict`` of the ``cliplung`` command.

``cliplung.cli`` calls :func:`register` with its subparsers. Every handler parses, calls one
function, prints, and returns an exit code; errors become exit codes in ``cliplung``'s ``main``
(:func:`cliplung.arguments.exit_code`). Heavy imports (torch, Ray, DeepSpeed) happen inside the
handlers, so ``cliplung --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from cliplung.arguments import EXIT_BAD_INPUT, EXIT_OK, add_config_args, config_from_args

__all__ = ["register"]

CV_FLAGS = {
    "data": "data.store",
    "storage": "storage.path",
    "storage_endpoint": "storage.endpoint",
    "name": "name",
    "epochs": "train.epochs",
    "workers": "train.workers",
}


def _bad(command: str, message: str) -> int:
    print(f"cliplung {command}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


# --------------------------------------------------------------------------- handlers


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cliplung.evaluate.evaluate import evaluate

    result = evaluate(
        args.run or args.checkpoint,
        args.data,
        fold=args.fold,
        out_dir=args.out,
        endpoint=args.storage_endpoint,
        storage=args.storage if args.run else None,
    )
    shown = {
        k: result.get(k)
        for k in ("checkpoint", "fold", "held_out", "n", "accuracy", "macro_f1", "auc", "ece")
    }
    print(json.dumps(shown, indent=2))
    print(f"report: {args.out}/report.html")
    return EXIT_OK


def _cv_config(args: argparse.Namespace):
    from cliplung.labels import SETTINGS

    extra: dict = {}
    if args.setting:
        chosen = SETTINGS[args.setting]
        extra.update(
            {
                "data.unsure_range": chosen.unsure_range,
                "data.task": chosen.task,
                "data.test_task": chosen.test_task,
            }
        )
    if args.early_stopping:
        patience, min_delta = args.early_stopping
        extra["train.early_stopping.patience"] = patience
        extra["train.early_stopping.min_delta"] = min_delta
    return config_from_args(args, CV_FLAGS, extra)


def _early_stopping(text: str) -> tuple[int, float]:
    """``PATIENCE`` or ``PATIENCE,MIN_DELTA``."""
    parts = text.split(",")
    try:
        if len(parts) > 2:
            raise ValueError
        patience = int(parts[0])
        min_delta = float(parts[1]) if len(parts) == 2 else 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected PATIENCE or PATIENCE,MIN_DELTA (e.g. 5 or 5,0.005), got {text!r}"
        ) from None
    if patience < 1 or not min_delta >= 0 or min_delta == float("inf"):
        raise argparse.ArgumentTypeError(f"patience must be >= 1 and min delta a number >= 0, got {text!r}")
    return patience, min_delta


def _folds(text: str) -> int | list[int]:
    """``5`` (folds 0..4) or ``0,2`` (those folds)."""
    try:
        if "," in text:
            return [int(v) for v in text.split(",") if v.strip()]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fold count or a comma-separated list, got {text!r}"
        ) from None


def cmd_cv(args: argparse.Namespace) -> int:
    from cliplung.evaluate.cv import cross_validate

    config = _cv_config(args)
    table = cross_validate(config, args.folds, address=args.address, out_dir=args.out, parallel=args.parallel)
    print(table.to_markdown())
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from cliplung.evaluate.cv import compare, resolve_methods

    methods = resolve_methods(args.methods)
    config = _cv_config(args)
    table = compare(
        config, args.folds, methods, out_dir=args.out, address=args.address, parallel=args.parallel
    )
    print(table.to_markdown())
    print(
        f"tables: {args.out}/compare_summary.md; charts: {args.out}/compare_summary.png, "
        f"{args.out}/compare_paired.png, {args.out}/compare_curves.png"
    )
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    if bool(args.dicom_dir) == bool(args.data):
        return _bad(
            "predict", "give either --dicom-dir SERIES --center X,Y,Z or --data STORE --out FILE.parquet"
        )
    if args.dicom_dir:
        if not args.center:
            return _bad("predict", "--dicom-dir needs --center X,Y,Z")
        from cliplung.evaluate.predict import predict_dicom

        print(
            json.dumps(
                predict_dicom(args.checkpoint, args.dicom_dir, ",".join(args.center), units=args.units),
                indent=2,
            )
        )
        return EXIT_OK
    if not args.out:
        return _bad("predict", "--data needs --out FILE.parquet")
    from cliplung.evaluate.predict import predict_store

    summary = predict_store(
        args.checkpoint,
        args.data,
        args.out,
        address=args.address,
        endpoint=args.storage_endpoint,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
    )
    print(json.dumps(summary, indent=2))
    return EXIT_OK


# --------------------------------------------------------------------------- parsers


def _add_cv_args(p: argparse.ArgumentParser) -> None:
    from cliplung.labels import SETTINGS

    add_config_args(p)
    p.add_argument("--data", required=True, help="nodule store (directory or s3://bucket/prefix)")
    p.add_argument(
        "--folds", type=_folds, default=5, help="fold count (0..n-1) or a list, e.g. 0,2 (default 5)"
    )
    p.add_argument("--storage", default="runs", help="run storage (directory or s3://bucket/prefix)")
    p.add_argument("--storage-endpoint", help="S3 endpoint URL; default AWS_ENDPOINT_URL")
    p.add_argument(
        "--name", help="base run name; fold k trains as NAME-fold<k> (compare: NAME-<method>-fold<k>)"
    )
    p.add_argument("--epochs", type=int, help="override train.epochs (with --early-stopping: the most)")
    p.add_argument("--workers", type=int, help="override train.workers (1 packs several runs at once)")
    p.add_argument(
        "--setting",
        choices=sorted(SETTINGS),
        help="dataset setting: label rule, training and test classes (default: the config's; "
        + "; ".join(f"{name}: {s.description}" for name, s in SETTINGS.items())
        + ")",
    )
    p.add_argument(
        "--early-stopping",
        type=_early_stopping,
        metavar="PATIENCE[,MIN_DELTA]",
        help="stop a run after PATIENCE epochs without a validation gain > MIN_DELTA (default 0) in "
        "train.checkpoint_metric (sets train.early_stopping)",
    )
    p.add_argument(
        "--parallel", type=int, default=1, help="runs trained at once, each a Ray task (default 1)"
    )
    p.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS, else an embedded Ray)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``evaluate``, ``cv``, ``compare`` and ``predict`` to the ``cliplung`` subparsers."""
    p = subparsers.add_parser(
        "evaluate",
        help="score the held-out test fold: metrics.json + HTML report (ROC, calibration, Grad-CAM)",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="run name under --storage: its best checkpoint by validation metric")
    which.add_argument("--checkpoint", help="model.pt, a checkpoint directory, or a run directory")
    p.add_argument("--data", required=True, help="nodule store (directory or s3://bucket/prefix)")
    p.add_argument("--fold", type=int, help="fold to score (default: the checkpoint's data.test_fold)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--storage", default="runs", help="run storage of --run (default runs)")
    p.add_argument("--storage-endpoint", help="S3 endpoint URL; default AWS_ENDPOINT_URL")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("cv", help="k-fold cross-validation: train and evaluate every fold")
    _add_cv_args(p)
    p.add_argument("--out", help="report directory (default reports/<name>)")
    p.set_defaults(func=cmd_cv)

    p = subparsers.add_parser(
        "compare", help="cross-validate several methods on the same folds; table + chart"
    )
    _add_cv_args(p)
    p.add_argument(
        "--methods",
        default="ce,coop,cocoop,cliplung",
        help="comma-separated, or all: ce, coop, cocoop, cliplung and the ablations cliplung-no-ic, "
        "cliplung-no-ca, cliplung-no-ia (that loss weight 0), cliplung-rating (rating attribute prompts); "
        "default ce,coop,cocoop,cliplung",
    )
    p.add_argument("--out", required=True, help="directory for the table, chart and per-run reports")
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser(
        "predict", help="class probabilities: one nodule of a DICOM series, or a whole store to Parquet"
    )
    p.add_argument("--checkpoint", required=True, help="model.pt, a checkpoint directory, or a run directory")
    p.add_argument("--dicom-dir", help="directory of one CT series (*.dcm)")
    p.add_argument(
        "--center",
        nargs="+",
        metavar="X,Y,Z",
        help="nodule centre (mm in patient space, or voxels with --units voxel): X,Y,Z or X Y Z; "
        "negative values: --center=-61.5,-150.2,-122.5 or --center -61.5 -150.2 -122.5",
    )
    p.add_argument("--units", choices=["mm", "voxel"], default="mm", help="units of --center (default mm)")
    p.add_argument("--data", help="nodule store to score entirely")
    p.add_argument("--out", help="Parquet file for --data")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=1, help="model actors of the Ray Data pipeline")
    p.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS, else an embedded Ray)")
    p.add_argument("--storage-endpoint", help="S3 endpoint URL; default AWS_ENDPOINT_URL")
    p.set_defaults(func=cmd_predict)
