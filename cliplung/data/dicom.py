"""Read one CT series with pydicom and cut isotropic nodule patches out of it.

Terms: *HU* (Hounsfield units) is the CT intensity scale, air -1000, water 0, soft tissue about
+40, bone and calcium several hundred and up; a DICOM file stores integers that
``RescaleSlope * value + RescaleIntercept`` turns into HU. A *series* is one CT acquisition, one
file per axial slice, identified by its SeriesInstanceUID.

**Finding files** (defined once, for ``cliplung prepare`` and ``cliplung predict``):
:func:`series_under` groups every ``*.dcm`` below a folder by SeriesInstanceUID (header-only reads);
:func:`find_series_files` picks one series of an LIDC patient folder (TCIA layout
``PATIENT/STUDY_UID/SERIES_UID/*.dcm`` first), :func:`find_single_series` requires a folder to hold
exactly one series (``predict --dicom-dir``).

**Reading** (:func:`read_series`) orders the slices along the slice normal, converts to HU and
refuses anything it cannot place exactly: a non-CT modality, multi-frame (enhanced) CT, a transfer
syntax no installed decoder reads (named by name and UID), slices that disagree in shape,
orientation or pixel spacing, pixel spacing <= 0, a rescale slope that is 0 or not finite, duplicate
positions, a missing slice, non-uniform spacing, slices sheared in-plane (a gantry-tilted
acquisition) or shifted, an unreadable file. Each refusal is a :class:`DicomError` naming the scan,
the file and the problem. Only geometry is kept: no header text (names, dates, institutions)
leaves this module.

**One geometry rule for training and inference** (:func:`read_axial_series`, used by the LIDC path
of ``cliplung prepare`` and by ``cliplung predict --dicom-dir``): the series must be axial with
its rows along the patient x axis and its columns along y, and the volume is flipped (never
resampled) into patient axes: slice index ascending in z (foot to head), row index ascending in y
(anterior to posterior), column index ascending in x (right to left). A feet-first series whose
images are stored mirrored (``ImageOrientationPatient`` -1,0,0,0,1,0, slice normal towards the feet)
therefore gives the same patches as a head-first one. Voxel coordinates given by people or by
pylidc (column, row of the stored images, slice index in ascending z) map into that volume with
:meth:`CTVolume.grid_to_voxel`.

:func:`extract_patch` is the one way a patch is cut, shared by ``cliplung prepare`` (LIDC and the
phantom) and ``cliplung predict``, so training and inference see identically prepared inputs; it
refuses a patch that is not finite or holds a single value (a window that misses the scan's
intensities), so neither a store nor a prediction is ever built on one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

__all__ = [
    "AIR_HU",
    "CTVolume",
    "DicomError",
    "extract_patch",
    "find_series_files",
    "find_single_series",
    "hu_to_unit",
    "patient_axes",
    "read_axial_series",
    "read_series",
    "series_under",
]

AIR_HU = -1000.0
"""Value of voxels outside the scanned volume (patches near the border are padded with air)."""
SPACING_TOLERANCE = 0.05
"""Largest relative deviation of one slice gap from the median gap before the series is refused."""
GAP_FACTOR = 1.5
"""A slice gap this many times the median means a missing slice, not just uneven spacing."""
AXIS_TOLERANCE = 1e-3
"""Largest deviation of a direction cosine from the patient axis it is taken to be."""
MULTI_FRAME_CT = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
"""SOP classes that keep a whole CT series as frames of one file."""


class DicomError(ValueError):
    """A DICOM series cannot be read or placed exactly; the message names the scan and the file."""


@dataclass(frozen=True)
class CTVolume:
    """A CT volume in HU with its geometry.

    Axes are numpy's (z, y, x) = (slice, row, column), i.e. pylidc's (k, i, j) reordered: voxel
    ``hu[k, i, j]`` is pylidc's ``(i, j, k)``. Slices are sorted by position along the slice
    normal (ascending z for axial scans, as pylidc's ``slice_zvals``).
    """

    hu: np.ndarray
    """float32 (z, y, x) Hounsfield units."""
    spacing: tuple[float, float, float]
    """Voxel size in mm along (z, y, x): median slice gap, row spacing, column spacing."""
    origin: tuple[float, float, float]
    """Patient-space (x, y, z) mm of voxel (0, 0, 0): ImagePositionPatient of the first slice."""
    direction: np.ndarray
    """3x3, columns are the patient-space unit vectors of the x (column), y (row) and slice axes."""
    slice_positions: np.ndarray
    """Each slice's ImagePositionPatient projected on the slice normal, mm, ascending."""
    z_positions: np.ndarray
    """Each slice's ImagePositionPatient z (mm), in volume order; pylidc's ``slice_zvals``."""
    series_uid: str = ""
    files: tuple[str, ...] = ()
    """The file of each slice, in volume order."""
    grid_flips: tuple[bool, bool] = (False, False)
    """Whether the rows (y) and columns (x) of the stored images were reversed to reach patient
    axes (:func:`patient_axes`)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def world_to_voxel(self, xyz_mm: Sequence[float]) -> np.ndarray:
        """Patient-space (x, y, z) mm to fractional voxel (z, y, x) of this volume."""
        rel = np.asarray(xyz_mm, dtype=np.float64) - np.asarray(self.origin)
        ijk = np.linalg.solve(self.direction, rel)  # (column, row, slice) in mm
        return np.array([ijk[2] / self.spacing[0], ijk[1] / self.spacing[1], ijk[0] / self.spacing[2]])

    def grid_to_voxel(self, zyx: Sequence[float]) -> np.ndarray:
        """(slice index, row, column) of the stored images (pylidc's (k, i, j) order as (z, y, x)) to
        a voxel (z, y, x) of this volume: the same point, whatever :func:`patient_axes` flipped."""
        z, y, x = (float(v) for v in zyx)
        if self.grid_flips[0]:
            y = self.shape[1] - 1 - y
        if self.grid_flips[1]:
            x = self.shape[2] - 1 - x
        return np.array([z, y, x], dtype=np.float64)


# --------------------------------------------------------------------------- finding files


def _dicom_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm") if p.is_file() and not p.name.startswith("."))


def _unreadable(name: str, path: Path, exc: BaseException) -> DicomError:
    reason = " ".join(str(exc).split())[:300] or type(exc).__name__
    return DicomError(f"{name}: file {path}: not a readable DICOM file ({type(exc).__name__}: {reason})")


def series_under(root: str | os.PathLike, *, scan: str = "") -> dict[str, list[Path]]:
    """Every ``*.dcm`` file below ``root`` grouped by SeriesInstanceUID ("" when a file has none),
    files sorted by path; header-only reads (no pixel data). Raises :class:`DicomError` for a
    missing folder, a folder without DICOM files, or an unreadable file."""
    import pydicom

    name = scan or str(root)
    root = Path(root)
    if not root.is_dir():
        raise DicomError(f"{name}: folder {root} does not exist")
    files = _dicom_files(root)
    if not files:
        raise DicomError(f"{name}: no DICOM (*.dcm) files under {root}")
    groups: dict[str, list[Path]] = {}
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            uid = str(header.get("SeriesInstanceUID", "") or "").strip()
        except Exception as exc:  # pydicom raises many types for damaged files
            raise _unreadable(name, path, exc) from None
        groups.setdefault(uid, []).append(path)
    return groups


def find_series_files(
    patient_dir: str | os.PathLike, series_uid: str, *, study_uid: str | None = None, scan: str = ""
) -> list[Path]:
    """The files of series ``series_uid`` under ``patient_dir``.

    Tries the TCIA layout ``patient_dir/study_uid/series_uid/*.dcm`` first, then every ``*.dcm``
    below ``patient_dir`` whose SeriesInstanceUID matches (:func:`series_under`).
    """
    name = scan or str(patient_dir)
    root = Path(patient_dir)
    if not root.is_dir():
        raise DicomError(f"{name}: patient folder {root} does not exist")
    if study_uid:
        tcia = root / study_uid / series_uid
        if tcia.is_dir():
            files = _dicom_files(tcia)
            if files:
                return files
    groups = series_under(root, scan=name)
    if series_uid not in groups:
        found = ", ".join(sorted(uid or "<none>" for uid in groups))
        raise DicomError(f"{name}: series {series_uid} not found under {root} (series found: {found})")
    return groups[series_uid]


def find_single_series(dicom_dir: str | os.PathLike, *, scan: str = "") -> tuple[str, list[Path]]:
    """The SeriesInstanceUID and files of the one series under ``dicom_dir`` (``*.dcm``, recursively).

    Raises :class:`DicomError` when there is no DICOM file, an unreadable one, or several series.
    """
    name = scan or str(dicom_dir)
    groups = series_under(dicom_dir, scan=name)
    if len(groups) > 1:
        counts = ", ".join(f"{uid or '<none>'} ({len(v)} files)" for uid, v in sorted(groups.items()))
        raise DicomError(f"{name}: holds several series ({counts}); pass the directory of one series")
    ((uid, paths),) = groups.items()
    if not uid:
        raise DicomError(f"{name}: file {paths[0]}: no SeriesInstanceUID")
    return uid, paths


# --------------------------------------------------------------------------- header values


def _read_dataset(path: Path, name: str):
    import pydicom

    try:
        return pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for damaged files
        raise _unreadable(name, path, exc) from None


def _get(ds, keyword: str, path: Path, name: str, default=None):
    """``ds.get(keyword)``; a value pydicom cannot convert (wrong VR, bad bytes) is a DicomError."""
    try:
        return ds.get(keyword, default)
    except Exception as exc:
        raise DicomError(
            f"{name}: file {path}: {keyword} is unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from None


def _floats(ds, keyword: str, count: int, path: Path, name: str) -> np.ndarray:
    value = _get(ds, keyword, path, name)
    try:
        if isinstance(value, str | bytes):
            raise TypeError
        values = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        values = np.array([])
    if values.shape != (count,) or not np.isfinite(values).all():
        raise DicomError(f"{name}: file {path}: {keyword} missing or malformed (expected {count} numbers)")
    return values


def _number(ds, keyword: str, path: Path, name: str, default: float) -> float:
    """A single finite number (``default`` when the element is absent or empty)."""
    value = _get(ds, keyword, path, name)
    if value is None or value == "":
        return default
    try:
        if isinstance(value, str | bytes):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise DicomError(f"{name}: file {path}: {keyword} is not a number ({value!r:.60})") from None
    if not math.isfinite(number):
        raise DicomError(f"{name}: file {path}: {keyword} is {number}, expected a finite number")
    return number


def _count(ds, keyword: str, path: Path, name: str, default: int) -> int:
    """A non-negative integer element such as Rows (``default`` when absent)."""
    value = _get(ds, keyword, path, name)
    if value is None or value == "":
        return default
    try:
        if isinstance(value, bool | str | bytes):
            raise TypeError
        number = int(value)
        if number != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise DicomError(f"{name}: file {path}: {keyword} is not an integer ({value!r:.60})") from None
    if number < 0:
        raise DicomError(f"{name}: file {path}: {keyword} is {number}, expected >= 0")
    return number


def _check_file_kind(ds, path: Path, name: str) -> None:
    """Refuse what is not single-frame CT in a transfer syntax an installed decoder reads."""
    modality = str(_get(ds, "Modality", path, name, "") or "").strip()
    if modality != "CT":
        raise DicomError(f"{name}: file {path}: modality is {modality or 'missing'!r}, expected 'CT'")
    sop = str(_get(ds, "SOPClassUID", path, name, "") or "").strip()
    frames = _count(ds, "NumberOfFrames", path, name, 1)
    if sop in MULTI_FRAME_CT or frames > 1:
        kind = f"{MULTI_FRAME_CT[sop]}, " if sop in MULTI_FRAME_CT else ""
        raise DicomError(
            f"{name}: file {path}: multi-frame CT ({kind}{frames} frame{'s' if frames != 1 else ''} in one "
            "file) is not supported; export the series as single-frame CT Image Storage, one file per slice"
        )
    _check_transfer_syntax(ds, path, name)


def _check_transfer_syntax(ds, path: Path, name: str) -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    raw = meta.get("TransferSyntaxUID") if meta is not None else None
    if raw is None:
        return  # no file meta: pydicom reads the data set as implicit VR little endian
    uid = UID(str(raw).strip())
    if not uid.is_transfer_syntax:
        raise DicomError(
            f"{name}: file {path}: unknown transfer syntax {uid} (not a DICOM standard one); "
            "its pixel data cannot be decoded"
        )
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise DicomError(
            f"{name}: file {path}: pixel data is encoded as {uid.name} ({uid}), which no DICOM decoder "
            "for pydicom reads; convert the series to an image transfer syntax (e.g. Explicit VR Little "
            "Endian) first"
        ) from None
    if not decoder.is_available:
        options = "; ".join(decoder.missing_dependencies) or "none known"
        raise DicomError(
            f"{name}: file {path}: pixel data is compressed as {uid.name} ({uid}) and no decoder for it "
            f"is installed (options: {options})"
        )


# --------------------------------------------------------------------------- reading a series


def read_series(
    patient_dir: str | os.PathLike,
    series_uid: str,
    *,
    study_uid: str | None = None,
    scan: str = "",
    files: Sequence[str | os.PathLike] | None = None,
) -> CTVolume:
    """Read series ``series_uid`` under ``patient_dir`` into a :class:`CTVolume` (HU, z/y/x).

    ``scan`` names the scan in error messages (e.g. ``LIDC-IDRI-0001``). ``files`` skips the search
    and reads exactly those files. Raises :class:`DicomError` on anything it cannot place exactly.
    Slices come in the order of the slice normal; :func:`read_axial_series` is what training and
    inference use.
    """
    name = scan or str(patient_dir)
    paths = (
        [Path(f) for f in files]
        if files is not None
        else find_series_files(patient_dir, series_uid, study_uid=study_uid, scan=name)
    )
    if not paths:
        raise DicomError(f"{name}: no DICOM files for series {series_uid}")
    datasets = []
    for path in paths:
        ds = _read_dataset(path, name)
        uid = str(_get(ds, "SeriesInstanceUID", path, name, "") or "").strip()
        if uid != series_uid:
            continue  # another series sharing the folder
        datasets.append((path, ds))
    if not datasets:
        raise DicomError(f"{name}: none of the {len(paths)} files belongs to series {series_uid}")
    # Geometry from headers first: a refused series costs no pixel decoding.
    stack = _stack(datasets, series_uid, name)
    return CTVolume(
        hu=_decode_hu(stack.records, stack.shape, name),
        spacing=(stack.gap, float(stack.spacing_yx[0]), float(stack.spacing_yx[1])),
        origin=tuple(float(v) for v in stack.ipp[0]),
        direction=stack.direction,
        slice_positions=stack.along,
        z_positions=stack.ipp[:, 2].copy(),
        series_uid=series_uid,
        files=tuple(str(r[0]) for r in stack.records),
    )


@dataclass(frozen=True)
class _Stack:
    """A series' slices placed from their headers alone, in order along the slice normal."""

    records: list[tuple[Path, object, float, float]]
    """(file, dataset, rescale slope, rescale intercept) per slice."""
    shape: tuple[int, int]
    spacing_yx: np.ndarray
    direction: np.ndarray
    ipp: np.ndarray
    along: np.ndarray
    gap: float


def _stack(datasets: list, series_uid: str, name: str) -> _Stack:
    """Check every header and order the slices (see :func:`read_series` for what is refused). One
    function on purpose: the checks build on each other in the order a reader would make them."""
    for path, ds in datasets:
        _check_file_kind(ds, path, name)
    first_path, first = datasets[0]
    orientation = _floats(first, "ImageOrientationPatient", 6, first_path, name)
    spacing_yx = _floats(first, "PixelSpacing", 2, first_path, name)
    if not (spacing_yx > 0).all():
        raise DicomError(
            f"{name}: file {first_path}: PixelSpacing {spacing_yx.tolist()} mm, expected two values > 0"
        )
    shape = (_count(first, "Rows", first_path, name, 0), _count(first, "Columns", first_path, name, 0))
    positions, records = [], []
    for path, ds in datasets:
        size = (_count(ds, "Rows", path, name, 0), _count(ds, "Columns", path, name, 0))
        if size != shape:
            raise DicomError(
                f"{name}: file {path}: image size {size[0]}x{size[1]} differs from "
                f"{shape[0]}x{shape[1]} in {first_path.name}"
            )
        if 0 in shape:
            raise DicomError(f"{name}: file {path}: image size {size[0]}x{size[1]} (Rows x Columns) is empty")
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, path, name), orientation, atol=1e-4):
            raise DicomError(f"{name}: file {path}: ImageOrientationPatient differs from {first_path.name}")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, path, name), spacing_yx, rtol=1e-4, atol=1e-5):
            raise DicomError(f"{name}: file {path}: PixelSpacing differs from {first_path.name}")
        slope = _number(ds, "RescaleSlope", path, name, 1.0)
        if slope == 0:
            raise DicomError(f"{name}: file {path}: RescaleSlope is 0 (every voxel would have the same HU)")
        intercept = _number(ds, "RescaleIntercept", path, name, 0.0)
        positions.append(_floats(ds, "ImagePositionPatient", 3, path, name))
        records.append((path, ds, slope, intercept))

    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if not all(np.isclose(np.linalg.norm(v), 1.0, atol=1e-3) for v in (row_dir, col_dir, normal)):
        raise DicomError(f"{name}: file {first_path}: ImageOrientationPatient is not two orthonormal vectors")
    ipp = np.stack(positions)
    with np.errstate(over="ignore", invalid="ignore"):
        along = ipp @ normal
    if not np.isfinite(along).all() or np.abs(ipp).max() > 1e7:  # 10 km: no scanner is that big
        raise DicomError(f"{name}: ImagePositionPatient values out of range (up to {np.abs(ipp).max():g} mm)")
    order = np.argsort(along, kind="stable")
    along, ipp = along[order], ipp[order]
    records = [records[i] for i in order]
    if len(records) < 2:
        raise DicomError(f"{name}: series {series_uid} has a single slice; a volume needs at least two")
    files = [r[0] for r in records]
    gaps = np.diff(along)
    for i, gap in enumerate(gaps):
        if gap < 1e-3:
            raise DicomError(
                f"{name}: files {files[i]} and {files[i + 1]}: duplicate slice position {along[i]:.3f} mm"
            )
    median = float(np.median(gaps))
    for i, gap in enumerate(gaps):
        if gap > GAP_FACTOR * median:
            raise DicomError(
                f"{name}: missing slice between files {files[i]} and {files[i + 1]}: gap {gap:.3f} mm, "
                f"slice spacing {median:.3f} mm"
            )
        if abs(gap - median) > SPACING_TOLERANCE * median:
            raise DicomError(
                f"{name}: non-uniform slice spacing at file {files[i + 1]}: gap {gap:.3f} mm, "
                f"median {median:.3f} mm (tolerance {SPACING_TOLERANCE:.0%})"
            )
    _check_not_sheared(ipp, along, normal, spacing_yx, files, records[0][1], name)
    direction = np.stack([row_dir, col_dir, normal], axis=1)
    return _Stack(records, shape, spacing_yx, direction, ipp, along, median)


def _decode_hu(records: list, shape: tuple[int, int], name: str) -> np.ndarray:
    """float32 (z, y, x) HU of the ordered slices: ``slope * stored + intercept``."""
    hu = None  # allocated once the first slice decodes to the header's size (Rows x Columns may lie)
    for k, (path, ds, slope, intercept) in enumerate(records):
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # pydicom raises many types for broken pixel data
            raise DicomError(
                f"{name}: file {path}: pixel data unreadable or truncated ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:300]})"
            ) from None
        if pixels.shape != shape:
            raise DicomError(f"{name}: file {path}: pixel data has shape {pixels.shape}, expected {shape}")
        if hu is None:
            hu = np.empty((len(records), *shape), dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            hu[k] = pixels.astype(np.float64) * slope + intercept
        if not np.isfinite(hu[k]).all():
            raise DicomError(
                f"{name}: file {path}: RescaleSlope {slope:g} and RescaleIntercept {intercept:g} give HU "
                "values beyond float32"
            )
    return hu


def _check_not_sheared(
    ipp: np.ndarray, along: np.ndarray, normal: np.ndarray, spacing_yx, files, first, name: str
) -> None:
    """In-plane offsets must agree: a slice shifted sideways would misplace every annotation. When
    every slice is offset in proportion to its position, the series is sheared, which is what a
    tilted gantry gives; the message says so."""
    inplane = (ipp - ipp[0]) - np.outer(along - along[0], normal)
    tolerance = 0.01 * max(float(np.min(spacing_yx)), 1e-3) + 1e-3
    bad = np.flatnonzero(np.linalg.norm(inplane, axis=1) > tolerance)
    if not bad.size:
        return
    dz = (along - along[0])[:, None]
    shear = (dz * inplane).sum(axis=0) / max(float((dz**2).sum()), 1e-12)  # mm in-plane per mm along
    linear = np.linalg.norm(inplane - dz * shear, axis=1).max() <= tolerance
    if linear and len(ipp) > 2:
        angle = math.degrees(math.atan(float(np.linalg.norm(shear))))
        try:
            recorded = f"; GantryDetectorTilt {float(first.GantryDetectorTilt):g} degrees"
        except Exception:  # absent or unreadable: the geometry alone names it
            recorded = ""
        raise DicomError(
            f"{name}: files {files[0]} to {files[-1]}: slices are sheared in-plane by {angle:.2f} degrees "
            f"(gantry tilt{recorded}): each slice is offset {np.linalg.norm(shear) * (along[1] - along[0]):.3f} mm "
            "sideways from the one before; resample the series to an orthogonal grid first"
        )
    raise DicomError(f"{name}: file {files[bad[0]]}: slice is shifted in-plane relative to {files[0]}")


def patient_axes(volume: CTVolume, *, scan: str = "") -> CTVolume:
    """``volume`` as an axial volume in patient axes (see the module docstring), or a DicomError.

    The rule training and inference share: the slice normal must be the patient z axis (either way),
    rows the x axis and columns the y axis (either way); the voxels are flipped, never resampled.
    """
    name = scan or volume.series_uid
    d = volume.direction
    first = volume.files[0] if volume.files else "the first file"
    normal = d[:, 2]
    if not np.allclose(np.abs(normal), (0.0, 0.0, 1.0), atol=AXIS_TOLERANCE):
        angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
        tilt = (
            " about the x axis, as a gantry-tilted acquisition gives"
            if abs(normal[0]) <= AXIS_TOLERANCE and angle < 45
            else ""
        )
        raise DicomError(
            f"{name}: file {first}: series is not axial: slice normal {(np.round(normal, 3) + 0.0).tolist()} is "
            f"{angle:.1f} degrees from the z axis{tilt}; only axial series are supported"
        )
    if not (
        np.allclose(np.abs(d[:, 0]), (1.0, 0.0, 0.0), atol=AXIS_TOLERANCE)
        and np.allclose(np.abs(d[:, 1]), (0.0, 1.0, 0.0), atol=AXIS_TOLERANCE)
    ):
        raise DicomError(
            f"{name}: file {first}: the image rows run along {(np.round(d[:, 0], 3) + 0.0).tolist()} and the "
            f"columns along {(np.round(d[:, 1], 3) + 0.0).tolist()} (ImageOrientationPatient): only images "
            "whose rows follow the patient x axis and columns the y axis are supported (no in-plane rotation)"
        )
    flip_x, flip_y, flip_z = bool(d[0, 0] < 0), bool(d[1, 1] < 0), bool(normal[2] < 0)
    if not (flip_x or flip_y or flip_z):
        return volume
    n = volume.shape
    hu = volume.hu[:: -1 if flip_z else 1, :: -1 if flip_y else 1, :: -1 if flip_x else 1]
    signs = np.array([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, -1.0 if flip_z else 1.0])
    far = np.array(
        [
            (n[2] - 1) * volume.spacing[2] if flip_x else 0.0,
            (n[1] - 1) * volume.spacing[1] if flip_y else 0.0,
            (n[0] - 1) * volume.spacing[0] if flip_z else 0.0,
        ]
    )
    origin = np.asarray(volume.origin) + d @ far
    order = slice(None, None, -1) if flip_z else slice(None)
    return replace(
        volume,
        hu=np.ascontiguousarray(hu),
        origin=tuple(float(v) for v in origin),
        direction=d * signs,
        slice_positions=(-volume.slice_positions[order] if flip_z else volume.slice_positions).copy(),
        z_positions=volume.z_positions[order].copy(),
        files=tuple(volume.files[order]),
        grid_flips=(flip_y, flip_x),
    )


def read_axial_series(
    patient_dir: str | os.PathLike,
    series_uid: str,
    *,
    study_uid: str | None = None,
    scan: str = "",
    files: Sequence[str | os.PathLike] | None = None,
) -> CTVolume:
    """:func:`read_series`, then :func:`patient_axes`: what ``prepare`` and ``predict`` both read."""
    volume = read_series(patient_dir, series_uid, study_uid=study_uid, scan=scan, files=files)
    return patient_axes(volume, scan=scan or str(patient_dir))


# --------------------------------------------------------------------------- patches


def hu_to_unit(hu: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """Clip HU to ``hu_window`` = (lo, hi) and scale linearly to [0, 1] (float32)."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def extract_patch(
    volume: CTVolume,
    center: Sequence[float],
    patch_size: int,
    spacing_mm: float,
    hu_window: tuple[float, float],
    *,
    scan: str = "",
) -> np.ndarray:
    """A cubic patch of ``patch_size``^3 voxels of ``spacing_mm`` around ``center``.

    ``center`` is a fractional voxel position (z, y, x) in ``volume`` (see
    :meth:`CTVolume.world_to_voxel` for patient-space mm). The patch is centred exactly on it (for an
    even size the centre lies between the two middle voxels), resampled with trilinear
    interpolation, padded with air (-1000 HU) outside the volume, then clipped to ``hu_window`` and
    scaled to [0, 1]. Axes follow the volume's (z, y, x). Returns float32.

    Raises :class:`DicomError` (prefixed by ``scan``) when the patch is not finite or every voxel has
    the same value: nothing a model could learn from or score.
    """
    from scipy.ndimage import map_coordinates

    offsets_mm = (np.arange(patch_size, dtype=np.float64) - (patch_size - 1) / 2.0) * spacing_mm
    axes = [float(c) + offsets_mm / s for c, s in zip(center, volume.spacing, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    hu = map_coordinates(volume.hu, grid, order=1, mode="constant", cval=AIR_HU, output=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        patch = hu_to_unit(hu, hu_window)
    where = f"{scan + ': ' if scan else ''}patch of {patch_size}^3 voxels around voxel (z, y, x) " + (
        f"({', '.join(f'{float(c):.1f}' for c in center)})"
    )
    if not np.isfinite(patch).all():
        raise DicomError(f"{where} is not finite (HU window {list(hu_window)})")
    if patch.size and patch.min() == patch.max():
        lo_hu, hi_hu = float(np.min(hu)), float(np.max(hu))
        raise DicomError(
            f"{where} holds the single value {float(patch.flat[0]):g} after the HU window "
            f"{list(hu_window)} (the scan there spans {lo_hu:g}..{hi_hu:g} HU): the window misses the "
            "scan's intensities (check prepare.hu_window) or the centre lies in a uniform region"
        )
    return patch
