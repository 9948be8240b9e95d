"""Read one CT series with pydicom and cut isotropic nodule patches out of it.

Terms: *HU* (Hounsfield units) is the CT intensity scale, air -1000, water 0, soft tissue about
+40, bone and calcium several hundred and up; a DICOM file stores integers that
``RescaleSlope * value + RescaleIntercept`` turns into HU. A *series* is one CT acquisition, one
file per axial slice, identified by its SeriesInstanceUID.

:func:`read_series` finds a series' files under a patient folder (TCIA layout
``PATIENT/STUDY_UID/SERIES_UID/*.dcm`` first, else any ``PATIENT/**/*.dcm`` whose
SeriesInstanceUID matches), orders the slices along the slice normal, converts to HU and refuses
anything it cannot place exactly: a non-CT modality, slices that disagree in shape, orientation or
pixel spacing, duplicate positions, a missing slice, non-uniform spacing, an unreadable file. Each
refusal is a :class:`DicomError` naming the scan, the file and the problem. Only geometry is kept:
no header text (names, dates, institutions) leaves this module.

:func:`extract_patch` is the one way a patch is cut, shared by ``cliplung prepare`` (LIDC and the
phantom) and ``cliplung predict``, so training and inference see identically prepared inputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "AIR_HU",
    "CTVolume",
    "DicomError",
    "extract_patch",
    "find_series_files",
    "hu_to_unit",
    "read_series",
]

AIR_HU = -1000.0
"""Value of voxels outside the scanned volume (patches near the border are padded with air)."""
SPACING_TOLERANCE = 0.05
"""Largest relative deviation of one slice gap from the median gap before the series is refused."""
GAP_FACTOR = 1.5
"""A slice gap this many times the median means a missing slice, not just uneven spacing."""


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

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def world_to_voxel(self, xyz_mm: Sequence[float]) -> np.ndarray:
        """Patient-space (x, y, z) mm to fractional voxel (z, y, x) of this volume."""
        rel = np.asarray(xyz_mm, dtype=np.float64) - np.asarray(self.origin)
        ijk = np.linalg.solve(self.direction, rel)  # (column, row, slice) in mm
        return np.array([ijk[2] / self.spacing[0], ijk[1] / self.spacing[1], ijk[0] / self.spacing[2]])


# --------------------------------------------------------------------------- finding files


def _dicom_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm") if p.is_file() and not p.name.startswith("."))


def find_series_files(
    patient_dir: str | os.PathLike, series_uid: str, *, study_uid: str | None = None, scan: str = ""
) -> list[Path]:
    """The files of series ``series_uid`` under ``patient_dir``.

    Tries the TCIA layout ``patient_dir/study_uid/series_uid/*.dcm`` first, then every ``*.dcm``
    below ``patient_dir`` whose SeriesInstanceUID matches (header-only reads, no pixel data).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

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
    candidates = _dicom_files(root)
    if not candidates:
        raise DicomError(f"{name}: no DICOM (*.dcm) files under {root}")
    matched, others = [], set()
    for path in candidates:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise DicomError(
                f"{name}: file {path}: not a readable DICOM file ({type(exc).__name__}: {exc})"
            ) from None
        uid = str(header.get("SeriesInstanceUID", "")).strip()
        if uid == series_uid:
            matched.append(path)
        else:
            others.add(uid or "<none>")
    if not matched:
        found = ", ".join(sorted(others)) or "none"
        raise DicomError(f"{name}: series {series_uid} not found under {root} (series found: {found})")
    return matched


# --------------------------------------------------------------------------- reading a series


def _read_dataset(path: Path, name: str):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as exc:
        raise DicomError(
            f"{name}: file {path}: not a readable DICOM file ({type(exc).__name__}: {exc})"
        ) from None


def _floats(ds, keyword: str, count: int, path: Path, name: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        values = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.array([])
    if values.shape != (count,) or not np.isfinite(values).all():
        raise DicomError(f"{name}: file {path}: {keyword} missing or malformed")
    return values


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
        uid = str(ds.get("SeriesInstanceUID", "")).strip()
        if uid != series_uid:
            continue  # another series sharing the folder
        datasets.append((path, ds))
    if not datasets:
        raise DicomError(f"{name}: none of the {len(paths)} files belongs to series {series_uid}")

    # Geometry from headers first: a refused series costs no pixel decoding.
    first_path, first = datasets[0]
    orientation = _floats(first, "ImageOrientationPatient", 6, first_path, name)
    spacing_yx = _floats(first, "PixelSpacing", 2, first_path, name)
    shape = (int(first.get("Rows", 0)), int(first.get("Columns", 0)))
    positions, records = [], []
    for path, ds in datasets:
        modality = str(ds.get("Modality", "")).strip()
        if modality != "CT":
            raise DicomError(f"{name}: file {path}: modality is {modality or 'missing'!r}, expected 'CT'")
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != shape or 0 in shape:
            raise DicomError(
                f"{name}: file {path}: image size {ds.get('Rows')}x{ds.get('Columns')} differs from "
                f"{shape[0]}x{shape[1]} in {first_path.name}"
            )
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, path, name), orientation, atol=1e-4):
            raise DicomError(f"{name}: file {path}: ImageOrientationPatient differs from {first_path.name}")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, path, name), spacing_yx, rtol=1e-4, atol=1e-5):
            raise DicomError(f"{name}: file {path}: PixelSpacing differs from {first_path.name}")
        positions.append(_floats(ds, "ImagePositionPatient", 3, path, name))
        records.append((path, ds))

    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise DicomError(f"{name}: file {first_path}: ImageOrientationPatient is not two orthonormal vectors")
    ipp = np.stack(positions)
    along = ipp @ normal
    order = np.argsort(along, kind="stable")
    along, ipp = along[order], ipp[order]
    records = [records[i] for i in order]
    if len(records) < 2:
        raise DicomError(f"{name}: series {series_uid} has a single slice; a volume needs at least two")
    gaps = np.diff(along)
    for i, gap in enumerate(gaps):
        if gap < 1e-3:
            raise DicomError(
                f"{name}: files {records[i][0]} and {records[i + 1][0]}: duplicate slice position {along[i]:.3f} mm"
            )
    median = float(np.median(gaps))
    for i, gap in enumerate(gaps):
        if gap > GAP_FACTOR * median:
            raise DicomError(
                f"{name}: missing slice between files {records[i][0]} and {records[i + 1][0]}: gap {gap:.3f} mm, "
                f"slice spacing {median:.3f} mm"
            )
        if abs(gap - median) > SPACING_TOLERANCE * median:
            raise DicomError(
                f"{name}: non-uniform slice spacing at file {records[i + 1][0]}: gap {gap:.3f} mm, "
                f"median {median:.3f} mm (tolerance {SPACING_TOLERANCE:.0%})"
            )
    # In-plane offsets must agree too: a slice shifted sideways would misplace every annotation.
    inplane = (ipp - ipp[0]) - np.outer(along - along[0], normal)
    bad = np.flatnonzero(np.linalg.norm(inplane, axis=1) > 0.01 * max(spacing_yx.min(), 1e-3) + 1e-3)
    if bad.size:
        raise DicomError(
            f"{name}: file {records[bad[0]][0]}: slice is shifted in-plane relative to {records[0][0]}"
        )

    hu = np.empty((len(records), *shape), dtype=np.float32)
    for k, (path, ds) in enumerate(records):
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # pydicom raises many types for broken pixel data
            raise DicomError(
                f"{name}: file {path}: pixel data unreadable or truncated ({type(exc).__name__}: {exc})"
            ) from None
        if pixels.shape != shape:
            raise DicomError(f"{name}: file {path}: pixel data has shape {pixels.shape}, expected {shape}")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        hu[k] = pixels.astype(np.float32) * slope + intercept

    direction = np.stack([row_dir, col_dir, normal], axis=1)
    return CTVolume(
        hu=hu,
        spacing=(median, float(spacing_yx[0]), float(spacing_yx[1])),
        origin=tuple(float(v) for v in ipp[0]),
        direction=direction,
        slice_positions=along,
        z_positions=ipp[:, 2].copy(),
        series_uid=series_uid,
        files=tuple(str(p) for p, _ in records),
    )


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
) -> np.ndarray:
    """A cubic patch of ``patch_size``^3 voxels of ``spacing_mm`` around ``center``.

    ``center`` is a fractional voxel position (z, y, x) in ``volume`` (see
    :meth:`CTVolume.world_to_voxel` for patient-space mm). The patch is centred exactly on it (for an
    even size the centre lies between the two middle voxels), resampled with trilinear
    interpolation, padded with air (-1000 HU) outside the volume, then clipped to ``hu_window`` and
    scaled to [0, 1]. Axes follow the volume's (z, y, x). Returns float32.
    """
    from scipy.ndimage import map_coordinates

    offsets_mm = (np.arange(patch_size, dtype=np.float64) - (patch_size - 1) / 2.0) * spacing_mm
    axes = [float(c) + offsets_mm / s for c, s in zip(center, volume.spacing, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    hu = map_coordinates(volume.hu, grid, order=1, mode="constant", cval=AIR_HU, output=np.float32)
    return hu_to_unit(hu, hu_window)
