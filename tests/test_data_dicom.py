"""cliplung.data.dicom on small synthetic series: ordering, HU, layouts, refusals, patient axes,
transfer syntaxes, patches."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_fixtures import mark_transfer_syntax, rewrite, write_ct_series

from cliplung.data.dicom import (
    CTVolume,
    DicomError,
    extract_patch,
    find_series_files,
    find_single_series,
    hu_to_unit,
    read_axial_series,
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


# --------------------------------------------------------------------------- header values


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"RescaleSlope": 0}, r"file .*0003\.dcm: RescaleSlope is 0"),
        ({"RescaleSlope": "NaN"}, r"file .*0003\.dcm: RescaleSlope is nan, expected a finite number"),
        ({"RescaleSlope": "inf"}, r"file .*0003\.dcm: RescaleSlope is inf"),
        ({"RescaleIntercept": "-inf"}, r"file .*0003\.dcm: RescaleIntercept is -inf"),
        ({"RescaleSlope": 1e38}, r"file .*0003\.dcm: RescaleSlope 1e\+38 .* give HU values beyond float32"),
        ({"PixelSpacing": [0.0, 0.7]}, r"file .*0003\.dcm: PixelSpacing differs"),
        ({"ImagePositionPatient": None}, r"file .*0003\.dcm: ImagePositionPatient missing or malformed"),
        ({"Rows": None}, r"file .*0003\.dcm: image size 0x8 differs from 8x8"),
    ],
)
def test_refuses_bad_header_values_naming_the_file(series, changes, message):
    patient, files = series
    rewrite(files[3], **changes)
    with pytest.raises(DicomError, match=message):
        read_series(patient, UID, study_uid=STUDY, scan="SCAN-8")


@pytest.mark.parametrize("spacing", [(0.0, 0.0), (-0.6, -0.7)])
def test_refuses_pixel_spacing_not_above_zero(tmp_path, spacing):
    write_ct_series(tmp_path / "P", _ramp(), z_positions=Z, series_uid=UID, pixel_spacing=spacing)
    with pytest.raises(DicomError, match=r"PixelSpacing \[-?0\.\d*, -?0\.\d*\] mm, expected two values > 0"):
        read_series(tmp_path / "P", UID)


# --------------------------------------------------------------------------- patient axes


def _mirrored(tmp_path, orientation, flip_axes):
    """The module's ramp as stored by a scanner whose images run along -x and/or -y: the same
    anatomy in patient space (voxel (0, 0, 0) of the standard series is still at (-160, -170, z))."""
    hu = _ramp()
    ox, oy = -160.0, -170.0
    if 2 in flip_axes:
        hu, ox = hu[:, :, ::-1], ox + 7 * 0.7
    if 1 in flip_axes:
        hu, oy = hu[:, ::-1, :], oy + 7 * 0.6
    write_ct_series(
        tmp_path / "FF",
        hu,
        z_positions=Z,
        series_uid=UID,
        pixel_spacing=(0.6, 0.7),
        origin_xy=(ox, oy),
        orientation=orientation,
    )
    return read_axial_series(tmp_path / "FF", UID, scan="FF")


@pytest.mark.parametrize(
    ("orientation", "flips"),
    [((-1, 0, 0, 0, 1, 0), (2,)), ((1, 0, 0, 0, -1, 0), (1,)), ((-1, 0, 0, 0, -1, 0), (1, 2))],
)
def test_mirrored_and_feet_first_series_read_into_patient_axes(tmp_path, series, orientation, flips):
    patient, _ = series
    standard = read_axial_series(patient, UID, study_uid=STUDY, scan="P1")
    volume = _mirrored(tmp_path, orientation, flips)
    # Slice normal towards the feet for one flip (feet-first storage), towards the head for two:
    # either way the volume comes out in patient axes, voxel for voxel the standard series.
    np.testing.assert_array_equal(volume.hu, standard.hu)
    np.testing.assert_allclose(volume.direction, np.eye(3), atol=1e-12)
    assert volume.origin == pytest.approx(standard.origin)
    np.testing.assert_allclose(volume.z_positions, Z)
    assert [f.rsplit("/", 1)[1] for f in volume.files] == [f.rsplit("/", 1)[1] for f in standard.files]
    point = (-160.0 + 3 * 0.7, -170.0 + 2 * 0.6, -95.0)
    np.testing.assert_allclose(volume.world_to_voxel(point), standard.world_to_voxel(point), atol=1e-9)
    # Voxel coordinates of the stored images (pylidc's convention) land on the same voxel.
    grid = [2.0, 7.0 - 2.0 if 1 in flips else 2.0, 7.0 - 3.0 if 2 in flips else 3.0]
    np.testing.assert_allclose(volume.grid_to_voxel(grid), [2.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("orientation", "message"),
    [
        (
            (0, 1, 0, 0, 0, -1),
            r"FF: file .*: series is not axial: slice normal \[-?1\.0, 0\.0, 0\.0\] is 90\.0 degrees",
        ),
        (
            (1, 0, 0, 0, 0.9659258, 0.2588190),
            r"series is not axial: .* 15\.0 degrees from the z axis about the x axis, as a gantry-tilted",
        ),
        ((0, 1, 0, 1, 0, 0), r"the image rows run along \[0\.0, 1\.0, 0\.0\] .*\(no in-plane rotation\)"),
        ((0.8660254, 0.5, 0, -0.5, 0.8660254, 0), r"rows run along \[0\.866, 0\.5, 0\.0\]"),
    ],
)
def test_non_axial_or_rotated_series_are_refused_as_such(tmp_path, orientation, message):
    normal = np.cross(orientation[:3], orientation[3:])
    # Slices stacked along their own normal: the series is consistent, only not axial.
    write_ct_series(tmp_path / "FF", _ramp(), z_positions=Z, series_uid=UID, orientation=orientation)
    for k, path in enumerate(sorted((tmp_path / "FF").glob("*.dcm"), reverse=True)):
        rewrite(
            path, ImagePositionPatient=[float(v) for v in (np.array([-160.0, -170.0, 0.0]) + Z[k] * normal)]
        )
    with pytest.raises(DicomError, match=message):
        read_axial_series(tmp_path / "FF", UID, scan="FF")


def test_gantry_tilt_is_named(tmp_path):
    # Axial images, each slice offset further in y: a tilted gantry reconstructed without resampling.
    step = 2.5 * np.tan(np.radians(12.0))
    write_ct_series(
        tmp_path / "T",
        _ramp(),
        z_positions=Z,
        series_uid=UID,
        shear_xy=(0.0, step),
        extra={"GantryDetectorTilt": 12.0},
    )
    with pytest.raises(
        DicomError,
        match=r"T: files .*0006\.dcm to .*0001\.dcm: slices are sheared in-plane by 12\.00 degrees "
        r"\(gantry tilt; GantryDetectorTilt 12 degrees\): each slice is offset 0\.531 mm",
    ):
        read_series(tmp_path / "T", UID, scan="T")


# --------------------------------------------------------------------------- file kinds


def test_multi_frame_ct_is_named(series):
    patient, files = series
    rewrite(files[0], SOPClassUID="1.2.840.10008.5.1.4.1.1.2.1", NumberOfFrames=6)
    with pytest.raises(
        DicomError,
        match=r"SCAN-9: file .*0006\.dcm: multi-frame CT \(Enhanced CT Image Storage, 6 frames in one file\) "
        r"is not supported; export the series as single-frame CT Image Storage",
    ):
        read_series(patient, UID, study_uid=STUDY, scan="SCAN-9")


@pytest.mark.parametrize(
    ("uid", "message"),
    [
        (
            "1.2.840.10008.1.2.4.100",
            r"file .*0003\.dcm: pixel data is encoded as MPEG2 Main Profile / Main Level "
            r"\(1\.2\.840\.10008\.1\.2\.4\.100\), which no DICOM decoder for pydicom reads",
        ),
        (
            "1.2.826.0.1.3680043.8.498.5",
            r"file .*0003\.dcm: unknown transfer syntax 1\.2\.826\.0\.1\.3680043\.8\.498\.5",
        ),
    ],
)
def test_undecodable_transfer_syntax_is_named(series, uid, message):
    patient, files = series
    mark_transfer_syntax(files[3], uid)
    with pytest.raises(DicomError, match=message):
        read_series(patient, UID, study_uid=STUDY)


def test_missing_decoder_is_named_with_what_to_install(series):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLosslessSV1

    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here (the jpeg-lossless extra)")
    patient, files = series
    mark_transfer_syntax(files[3], JPEGLosslessSV1)
    with pytest.raises(
        DicomError,
        match=r"file .*0003\.dcm: pixel data is compressed as JPEG Lossless, Non-Hierarchical, First-Order "
        r"Prediction \(Process 14 \[Selection Value 1\]\) \(1\.2\.840\.10008\.1\.2\.4\.70\) and no decoder for it "
        r"is installed \(options: .*pylibjpeg-libjpeg",
    ):
        read_series(patient, UID, study_uid=STUDY)


def test_reads_jpeg_ls_lossless(tmp_path):
    from pydicom.uid import JPEGLSLossless

    # Noise, so the compressed frames differ in size from raw ones (pydicom warns when they match).
    hu = _ramp() + np.random.default_rng(0).integers(0, 400, _ramp().shape)
    files = write_ct_series(tmp_path / "J", hu, z_positions=Z, series_uid=UID, compress=JPEGLSLossless)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == JPEGLSLossless
    np.testing.assert_allclose(read_series(tmp_path / "J", UID).hu, hu)


def test_single_series_discovery(tmp_path):
    write_ct_series(tmp_path / "one" / "a", _ramp(), z_positions=Z, series_uid=UID)
    uid, files = find_single_series(tmp_path / "one")
    assert uid == UID and len(files) == 6
    write_ct_series(tmp_path / "one" / "b", _ramp()[:2], z_positions=Z[:2], series_uid=UID + ".2")
    with pytest.raises(
        DicomError, match=rf"holds several series \({UID} \(6 files\), {UID}\.2 \(2 files\)\)"
    ):
        find_single_series(tmp_path / "one")
    with pytest.raises(DicomError, match=r"folder .*nowhere does not exist"):
        find_single_series(tmp_path / "nowhere")


def test_extract_patch_refuses_a_window_that_misses_the_scan():
    vol = _volume(np.full((20, 80, 80), -800.0) + np.arange(80))
    with pytest.raises(
        DicomError,
        match=r"S: patch of 8\^3 voxels around voxel \(z, y, x\) \(10\.0, 40\.0, 40\.0\) holds the single value 0 "
        r"after the HU window \[3000\.0, 4000\.0\] \(the scan there spans -767\.\.-753 HU\)",
    ):
        extract_patch(vol, (10, 40, 40), 8, 1.0, (3000.0, 4000.0), scan="S")
    # Finite, but wider than float32 holds: the scaled patch is NaN, refused as such.
    with pytest.raises(
        DicomError, match=r"\(10\.0, 40\.0, 40\.0\) is not finite \(HU window \[-1e\+308, 1e\+308\]\)"
    ):
        extract_patch(vol, (10, 40, 40), 8, 1.0, (-1e308, 1e308))
