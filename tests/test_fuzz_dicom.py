"""Property-based tests (hypothesis): mutated headers of a valid test-written series.

Each example copies a valid series, damages its headers (spacing, positions, orientation,
slope/intercept, sizes, modality, UIDs, frames, transfer syntax, pixel data; missing tags; wrong
VRs) in one file or all, and runs what users run on it:

* ``predict``'s cut (:func:`cliplung.evaluate.predict.dicom_patch`: series discovery, the shared
  reader and geometry rule, the patch), on a small synthetic series, many examples;
* ``cliplung prepare --source lidc`` on a real LIDC scan's geometry, a few examples (each reads 87
  slices of 512 x 512).

Every outcome must be a valid patch or store (finite, not constant, the right shape) or a
:class:`DicomError` / :class:`PredictError` / :class:`PrepareError` whose message names the series
and a file (or the field); never another exception, a hang or a half-written store.

Run time is kept small by default (fixed examples, ``derandomize``); set ``CLIPLUNG_FUZZ_EXAMPLES``
(e.g. 2000) for a longer, randomised search.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
import pytest
from dicom_fixtures import LIDC_FIXTURE_SCANS, write_ct_series, write_lidc_scan
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import DataElement
from pydicom.encaps import encapsulate

from cliplung.config import PrepareConfig, load_config
from cliplung.data.dicom import DicomError
from cliplung.data.prepare import PrepareError, prepare_store
from cliplung.data.store import NoduleStore
from cliplung.evaluate.predict import PredictError, dicom_patch

EXAMPLES = int(os.environ.get("CLIPLUNG_FUZZ_EXAMPLES", "0"))
SLOW_EXAMPLE_S = 60.0
"""An example that takes this long counts as a hang (a healthy one takes well under a second)."""


def fuzz_settings(default: int) -> settings:
    return settings(
        max_examples=EXAMPLES or default,
        derandomize=not EXAMPLES,  # the default run is the same every time
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
        ],
    )


# --------------------------------------------------------------------------- mutations

UID = "1.2.826.0.1.3680043.8.498.4242"
DS_TAGS = {
    "PixelSpacing": (0x00280030, 2),
    "ImagePositionPatient": (0x00200032, 3),
    "ImageOrientationPatient": (0x00200037, 6),
    "RescaleSlope": (0x00281053, 1),
    "RescaleIntercept": (0x00281052, 1),
    "SliceThickness": (0x00180050, 1),
    "GantryDetectorTilt": (0x00181120, 1),
}
US_TAGS = {
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101,
    "HighBit": 0x00280102,
    "PixelRepresentation": 0x00280103,
    "SamplesPerPixel": 0x00280002,
}
TEXT_TAGS = {
    "Modality": (0x00080060, "CS", ["CT", "MR", "", "ct", "CT\\MR", "DX"]),
    "SeriesInstanceUID": (0x0020000E, "UI", [UID, UID + ".1", "", "1.2.3"]),
    "SOPClassUID": (
        0x00080016,
        "UI",
        ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.4", ""],
    ),
    "NumberOfFrames": (0x00280008, "IS", ["1", "2", "0", "-1", "6", "x"]),
    "PhotometricInterpretation": (
        0x00280004,
        "CS",
        ["MONOCHROME2", "MONOCHROME1", "RGB", "PALETTE COLOR", ""],
    ),
}
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # implicit VR little endian: re-encoded, valid
    "1.2.840.10008.1.2.2",  # explicit VR big endian: re-encoded, valid
    "1.2.840.10008.1.2.4.100",  # MPEG2: no decoder exists
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless: decoder optional
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless, but the data is not JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE, but the data is not RLE
    "1.2.826.0.1.3680043.8.498.77",  # not a transfer syntax
]
ALL_TAGS = [*DS_TAGS, *US_TAGS, *TEXT_TAGS]

finite_or_not = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-5, max_value=5),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, 1e38, -1.0, 0.5, 2.5]),
)


@st.composite
def ds_values(draw, count: int) -> str:
    """A DS value of about ``count`` numbers, sometimes the wrong count or not numbers at all."""
    n = draw(st.sampled_from([count, count, count, 0, 1, count + 1]))
    items = [
        draw(st.one_of(finite_or_not.map(repr), st.sampled_from(["", "abc", "1e999", "NaN", "0x10", " 1 "])))
        for _ in range(n)
    ]
    return "\\".join(items)


@st.composite
def mutations(draw) -> list[tuple]:
    """1-3 mutations: (where, file index, kind, tag, value)."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["one", "one", "all"]))
        index = draw(st.integers(0, 5))
        kind = draw(st.sampled_from(["value", "value", "delete", "wrong_vr", "nudge", "pixels", "syntax"]))
        tag = draw(st.sampled_from(ALL_TAGS))
        if kind == "value":
            if tag in DS_TAGS:
                value = draw(ds_values(DS_TAGS[tag][1]))
            elif tag in US_TAGS:
                value = draw(st.one_of(st.integers(0, 65535), st.sampled_from([0, 1, 8, 12, 16, 32, 15, 17])))
            else:
                value = draw(st.one_of(st.sampled_from(TEXT_TAGS[tag][2]), st.text(max_size=20)))
        elif kind == "wrong_vr":
            vr = draw(st.sampled_from(["LO", "US", "OB", "FD", "SH", "UN", "SS", "DS"]))
            value = (
                vr,
                draw(st.one_of(st.text(max_size=12), st.binary(max_size=12), st.integers(-70000, 70000))),
            )
        elif kind == "nudge":
            tag = "ImagePositionPatient"
            value = (draw(st.integers(0, 2)), draw(st.floats(-6.0, 6.0)))
        elif kind == "pixels":
            value = draw(st.sampled_from(["truncate", "extend", "random", "empty"]))
        elif kind == "syntax":
            value = draw(st.sampled_from(TRANSFER_SYNTAXES))
        else:
            value = None
        out.append((where, index, kind, tag, value))
    return out


def _tag(keyword: str) -> int:
    if keyword in DS_TAGS:
        return DS_TAGS[keyword][0]
    if keyword in US_TAGS:
        return US_TAGS[keyword]
    return TEXT_TAGS[keyword][0]


def _vr(keyword: str) -> str:
    return "DS" if keyword in DS_TAGS else "US" if keyword in US_TAGS else TEXT_TAGS[keyword][1]


def _coerce_for_vr(vr: str, value):
    """A value pydicom can write for ``vr`` (the point is the wrong VR, not an unwritable file)."""
    if vr in ("US", "SS"):
        number = value if isinstance(value, int) else len(value)
        return number % 65536 if vr == "US" else max(-32768, min(32767, number))
    if vr in ("OB", "UN"):
        return value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
    if vr == "FD":
        return float(value) if isinstance(value, int) else float(len(value))
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return text.replace("\x00", "")


def apply_mutation(path: Path, kind: str, tag: str, value) -> None:
    """Rewrite ``path`` with one damaged header element (a fresh file: never through a hard link)."""
    ds = pydicom.dcmread(path)
    if kind == "delete":
        if tag in ds:
            del ds[tag]
    elif kind == "value":
        ds[_tag(tag)] = DataElement(_tag(tag), _vr(tag), value)
    elif kind == "wrong_vr":
        vr, raw = value
        ds[_tag(tag)] = DataElement(_tag(tag), vr, _coerce_for_vr(vr, raw))
    elif kind == "nudge":
        axis, delta = value
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ipp[axis] += delta
        ds.ImagePositionPatient = ipp
    elif kind == "pixels":
        data = bytes(ds.PixelData)
        ds.PixelData = {
            "truncate": data[: len(data) // 2],
            "extend": data + data[:64],
            "random": np.random.default_rng(len(data)).bytes(len(data)),
            "empty": b"",
        }[value]
    elif kind == "syntax":
        if value in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.2"):
            ds.file_meta.TransferSyntaxUID = value  # pydicom re-encodes the data set on save
        else:
            ds.PixelData = encapsulate([bytes(ds.PixelData)])
            ds.file_meta.TransferSyntaxUID = value
    path.unlink()
    ds.save_as(path)


def mutate(folder: Path, muts: list[tuple]) -> None:
    files = sorted(folder.rglob("*.dcm"))
    mode = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        for where, index, kind, tag, value in muts:
            for path in files if where == "all" else [files[index % len(files)]]:
                try:
                    apply_mutation(path, kind, tag, value)
                except Exception as exc:  # e.g. big endian with a value pydicom cannot encode
                    raise _Unwritable(str(exc)) from exc
    finally:
        pydicom.config.settings.writing_validation_mode = mode


class _Unwritable(Exception):
    """pydicom refused to write the damaged file: not an input a reader can ever see."""


def _kind(message: str) -> str:
    """The refusal without paths and numbers, for ``--hypothesis-show-statistics``."""
    text = re.sub(r"/\S+", "PATH", message.split(": ", 1)[-1])
    return "refused: " + re.sub(r"-?\d[\d.e+-]*", "N", text)[:70]


def _assert_clear(message: str, name: str) -> None:
    event(_kind(message))
    assert message.startswith(f"{name}: ") or message.startswith("--center"), message
    assert "Traceback" not in message and len(message) < 2000, message
    assert any(w in message for w in ("file ", "files ", "series", "patch", "folder", "--center")), message


def _assert_valid_patch(patch: np.ndarray, size: int) -> None:
    assert patch.shape == (size, size, size) and patch.dtype == np.float32
    assert np.isfinite(patch).all()
    assert patch.min() >= 0.0 and patch.max() <= 1.0
    assert patch.min() < patch.max(), "constant patch"


# --------------------------------------------------------------------------- predict's cut


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A valid 6 x 16 x 16 axial CT series: lung background, noise and a nodule in the middle."""
    rng = np.random.default_rng(7)
    z, y, x = np.indices((6, 16, 16))
    hu = (
        -850.0
        + 900.0 * (((z - 2.5) * 2.5) ** 2 + ((y - 7.5) * 0.8) ** 2 + ((x - 7.5) * 0.8) ** 2 < 16)
        + rng.normal(0, 15, (6, 16, 16))
    )
    folder = tmp_path_factory.mktemp("fuzz") / "series"
    write_ct_series(
        folder, hu, z_positions=[-40.0 + 2.5 * k for k in range(6)], pixel_spacing=0.8, series_uid=UID
    )
    return folder


PREPARE = PrepareConfig(patch_size=8, spacing_mm=1.0)


def test_template_is_valid(template) -> None:
    patch, _ = dicom_patch(template, (7.5, 7.5, 2.5), PREPARE, units="voxel")
    _assert_valid_patch(patch, 8)


@fuzz_settings(60)
@given(muts=mutations())
@example(muts=[("one", 2, "nudge", "ImagePositionPatient", (2, 0.05))])  # within the spacing tolerance
@example(muts=[("all", 0, "value", "RescaleSlope", "0")])
@example(muts=[("all", 0, "value", "PixelSpacing", "0.0\\0.0")])  # gave an all-zero patch before
def test_mutated_series_give_a_valid_patch_or_a_clear_error(template, muts) -> None:
    with tempfile.TemporaryDirectory(prefix="cliplung-fuzz-") as tmp:
        folder = Path(tmp) / "series"
        shutil.copytree(template, folder)
        try:
            mutate(folder, muts)
        except _Unwritable:
            return
        start = time.perf_counter()
        try:
            patch, _ = dicom_patch(folder, (7.5, 7.5, 2.5), PREPARE, units="voxel")
        except (DicomError, PredictError) as exc:
            _assert_clear(str(exc), str(folder))
        else:
            event("valid patch")
            _assert_valid_patch(patch, 8)
        assert time.perf_counter() - start < SLOW_EXAMPLE_S


# --------------------------------------------------------------------------- prepare's store


@pytest.fixture(scope="module")
def lidc_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-lidc")
    write_lidc_scan(root, LIDC_FIXTURE_SCANS[0], phi=None)
    return root


def _link_copy(source: Path, target: Path) -> None:
    shutil.copytree(source, target, copy_function=os.link)  # mutated files are rewritten, not edited


@fuzz_settings(4)
@given(muts=mutations())
@example(muts=[("all", 0, "value", "SliceThickness", "7.5")])  # not geometry: a valid store
@example(muts=[("one", 40, "value", "RescaleIntercept", "-1000")])  # one slice 24 HU brighter: still valid
def test_mutated_lidc_scan_gives_a_valid_store_or_a_clear_error(lidc_template, muts) -> None:
    from dicom_fixtures import lidc_scan

    from cliplung.data.lidc import scan_name

    name = scan_name(lidc_scan(LIDC_FIXTURE_SCANS[0]))
    with tempfile.TemporaryDirectory(prefix="cliplung-fuzz-") as tmp:
        root, out = Path(tmp) / "lidc", Path(tmp) / "store"
        _link_copy(lidc_template, root)
        try:
            mutate(root, muts)
        except _Unwritable:
            return
        config = load_config(
            "debug",
            ["prepare.source=lidc", f"prepare.lidc_dir={root}", "prepare.folds=2", "prepare.on_error=fail"],
        )
        start = time.perf_counter()
        try:
            summary = prepare_store(config, str(out), progress=False)
        except DicomError as exc:
            _assert_clear(str(exc), name)
            assert not out.exists(), "a refused build left a store behind"
        except PrepareError as exc:  # nothing usable came out: says so, in one line
            assert str(exc) and "Traceback" not in str(exc), str(exc)
            assert not out.exists(), "a refused build left a store behind"
        else:
            event("valid store")
            store = NoduleStore.open(str(out))
            store.validate()
            assert store.num_nodules == summary.nodules > 0
            patches = np.asarray(
                store.read_rows(0, store.num_nodules, ["patches"])["patches"], dtype=np.float32
            )
            for patch in patches:
                _assert_valid_patch(patch, config.prepare.patch_size)
        assert time.perf_counter() - start < SLOW_EXAMPLE_S
