"""cliplung.data.dicom on small synthetic series: ordering, HU, layouts, refusals, patches."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_fixtures import write_ct_series

from cliplung.data.dicom import (
    CTVolume,
    DicomError,
    extract_patch,
    find_series_files,
    hu_to_unit,
    read_series,
)

UID = "1.2.826.0.1.3680043.8.498.100"
STUDY = "1.2.826.0.1.3680043.8.498.200"
Z = [-100.0 + 2.5 * k for k in range(6)]


def _ramp() -> np.ndarray:
    """HU encoding the voxel index (unique, and even, so slope 2 stores it exactly)."""
    z, y, x = np.indices((6, 8, 8))
    return (100 * z + 10 * y + 2 * x - 1000).astype(np.float64)


@pytest.fixture
def series(tmp_path):
    folder = tmp_path / "P1" / STUDY / UID
    files = write_ct_series(
        folder,
        _ramp(),
        z_positions=Z,
        series_uid=UID,
        study_uid=STUDY,
        pixel_spacing=(0.6, 0.7),
        slope=2.0,
        intercept=-1024.0,
    )
    return tmp_path / "P1", files


def test_reads_series_in_z_order_with_rescale(series):
    patient, files = series
    vol = read_series(patient, UID, study_uid=STUDY, scan="P1")
    # Files are named by instance number, which runs against z: order must come from positions.
    assert [f.split("/")[-1] for f in vol.files] == [f.name for f in files]
    np.testing.assert_allclose(vol.hu, _ramp())
    assert vol.spacing == pytest.approx((2.5, 0.6, 0.7))
    np.testing.assert_allclose(vol.z_positions, Z)
    assert vol.origin == pytest.approx((-160.0, -170.0, -100.0))
    np.testing.assert_allclose(
        vol.world_to_voxel([-160.0 + 3 * 0.7, -170.0 + 2 * 0.6, -95.0]), [2, 2, 3], atol=1e-9
    )


def test_reads_compressed_pixel_data(tmp_path):
    write_ct_series(tmp_path / "P4" / "s", _ramp(), z_positions=Z, series_uid=UID, rle=True)
    np.testing.assert_allclose(read_series(tmp_path / "P4", UID).hu, _ramp())


def test_finds_series_by_uid_in_any_layout(tmp_path):
    write_ct_series(tmp_path / "P2" / "a" / "b", _ramp(), z_positions=Z, series_uid=UID)
    write_ct_series(
        tmp_path / "P2" / "other", _ramp()[:2], z_positions=Z[:2], series_uid=UID + ".9", modality="DX"
    )
    files = find_series_files(tmp_path / "P2", UID, study_uid=STUDY)
    assert len(files) == 6 and all("/a/b/" in str(f) for f in files)
    assert read_series(tmp_path / "P2", UID).shape == (6, 8, 8)  # the DX series next to it is ignored


def _rewrite(path, **changes):
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing", r"missing slice between files .*0005\.dcm and .*0003\.dcm: gap 5\.000 mm"),
        ("nonuniform", r"non-uniform slice spacing at file .*0003\.dcm: gap 1\.500 mm"),
        ("duplicate", r"duplicate slice position"),
        ("not_ct", r"file .*0003\.dcm: modality is 'MR', expected 'CT'"),
        ("truncated", r"file .*0003\.dcm: (pixel data unreadable or truncated|not a readable DICOM file)"),
        ("garbage", r"file .*0003\.dcm: not a readable DICOM file"),
        ("size", r"file .*0003\.dcm: image size 8x6 differs"),
        ("spacing", r"file .*0003\.dcm: PixelSpacing differs"),
        ("orientation", r"file .*0003\.dcm: ImageOrientationPatient differs"),
        ("shifted", r"file .*0003\.dcm: slice is shifted in-plane"),
    ],
)
def test_refuses_broken_series_naming_scan_and_file(series, breakage, message):
    patient, files = series
    target = files[3]  # instance 3, z = -92.5
    if breakage == "missing":
        files[2].unlink()  # instance 4
    elif breakage == "nonuniform":
        _rewrite(target, ImagePositionPatient=[-160.0, -170.0, Z[3] - 1.0])
    elif breakage == "duplicate":
        _rewrite(target, ImagePositionPatient=[-160.0, -170.0, Z[2]])
    elif breakage == "not_ct":
        _rewrite(target, Modality="MR")
    elif breakage == "truncated":
        target.write_bytes(target.read_bytes()[:-40])
    elif breakage == "garbage":
        target.write_bytes(b"\x00not dicom at all" * 10)
    elif breakage == "size":
        ds = pydicom.dcmread(target)
        ds.Columns = 6
        ds.PixelData = np.zeros((8, 6), np.int16).tobytes()
        ds.save_as(target)
    elif breakage == "spacing":
        _rewrite(target, PixelSpacing=[0.6, 0.8])
    elif breakage == "orientation":
        _rewrite(target, ImageOrientationPatient=[1, 0, 0, 0, 0.98, 0.19899749])
    elif breakage == "shifted":
        _rewrite(target, ImagePositionPatient=[-150.0, -170.0, Z[3]])
    with pytest.raises(DicomError, match=message) as info:
        read_series(patient, UID, study_uid=STUDY, scan="SCAN-7")
    assert str(info.value).startswith("SCAN-7: ")


def test_empty_folder_and_missing_series(tmp_path):
    (tmp_path / "EMPTY").mkdir()
    with pytest.raises(DicomError, match=r"SCAN-1: no DICOM \(\*\.dcm\) files under .*EMPTY"):
        read_series(tmp_path / "EMPTY", UID, scan="SCAN-1")
    write_ct_series(tmp_path / "P3" / "x", _ramp(), z_positions=Z, series_uid=UID + ".5")
    with pytest.raises(
        DicomError, match=rf"SCAN-2: series {UID} not found under .*P3 \(series found: {UID}\.5\)"
    ):
        read_series(tmp_path / "P3", UID, scan="SCAN-2")


def _volume(hu: np.ndarray, spacing=(2.0, 0.5, 0.5)) -> CTVolume:
    z = np.arange(hu.shape[0]) * spacing[0]
    return CTVolume(
        hu=hu.astype(np.float32),
        spacing=spacing,
        origin=(0, 0, 0),
        direction=np.eye(3),
        slice_positions=z,
        z_positions=z,
    )


def test_extract_patch_is_centred_isotropic_and_padded():
    hu = np.full((20, 80, 80), -800.0)
    # A bright 6 mm cube around voxel (10, 40, 40) at 2 x 0.5 x 0.5 mm spacing.
    hu[9:12, 34:47, 34:47] = 200.0
    vol = _volume(hu)
    patch = extract_patch(vol, (10, 40, 40), 9, 1.0, (-1000.0, 400.0))
    assert patch.shape == (9, 9, 9) and patch.dtype == np.float32
    assert patch[4, 4, 4] == pytest.approx(1200 / 1400)
    # 1 mm isotropic: the cube is ~6 mm wide along y and x, ~6 mm along z (3 slices of 2 mm).
    assert (patch[4, 4] > 0.6).sum() == 7 and (patch[:, 4, 4] > 0.6).sum() == 5
    np.testing.assert_allclose(patch, patch[::-1, ::-1, ::-1], atol=1e-6)  # symmetric about the centre
    # Outside the volume: air, i.e. 0 after windowing.
    corner = extract_patch(vol, (0, 0, 0), 8, 1.0, (-1000.0, 400.0))
    assert corner[0, 0, 0] == 0.0 and corner[-1, -1, -1] == pytest.approx(200 / 1400)


def test_hu_to_unit_clips_and_scales():
    np.testing.assert_allclose(
        hu_to_unit(np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0]), (-1000, 400)),
        [0.0, 0.0, 0.5, 1.0, 1.0],
    )
