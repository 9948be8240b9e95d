"""Dataset settings: the label rules, the training and test label sets, the 3 -> 2 probability map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import make_synthetic_store

from cliplung.config import ConfigError, apply_overrides, load_config
from cliplung.data.ingest import compute_splits
from cliplung.data.store import NoduleStore, write_store
from cliplung.evaluate.evaluate import evaluate
from cliplung.evaluate.splits import fold_rows
from cliplung.labels import (
    LABEL_RULE,
    SETTINGS,
    UNSURE_RANGES,
    describe_rule,
    label_from_malignancy,
    map_probabilities,
    setting_name,
)
from cliplung.model import build_model, save_inference

# Every mean of 1-4 integer ratings between 2 and 4, and the boundaries of both rules.
MEANS = np.array([2.0, 9 / 4, 7 / 3, 2.5, 8 / 3, 11 / 4, 3.0, 13 / 4, 10 / 3, 3.5, 11 / 3, 15 / 4, 4.0])


def test_default_rule_is_the_papers_and_the_stores():
    assert label_from_malignancy(MEANS).tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 2, 2]
    assert LABEL_RULE == "mean reader malignancy < 3: benign (0); == 3: unsure (1); > 3: malignant (2)"
    # float32, as the store keeps it, gives the same labels.
    assert (label_from_malignancy(MEANS.astype(np.float32)) == label_from_malignancy(MEANS)).all()


def test_band_rule_of_2012_03480():
    band = UNSURE_RANGES["band"]
    assert band == (2.5, 3.5)
    assert label_from_malignancy(MEANS, band).tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2]
    assert describe_rule(band) == (
        "mean reader malignancy < 2.5: benign (0); in [2.5, 3.5]: unsure (1); > 3.5: malignant (2)"
    )


def test_settings_have_names_overrides_and_round_trip():
    assert set(SETTINGS) == {
        "3class",
        "3class-test2",
        "2class",
        "band-3class",
        "band-3class-test2",
        "band-2class",
    }
    for name, setting in SETTINGS.items():
        cfg = load_config("debug", setting.overrides())
        d = cfg.data
        assert (d.unsure_range, d.task, d.scored_task) == (
            setting.unsure_range,
            setting.task,
            setting.test_task,
        )
        assert setting_name(d.unsure_range, d.task, d.scored_task) == name
        assert setting.description
    assert load_config("debug").data.scored_task == "3class"
    assert setting_name((3.0, 3.0), "3class", "3class") == "3class"
    assert setting_name((2.0, 3.0), "3class", "3class") is None


def test_bad_settings_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"^data\.test_task: a 2class model has no unsure output"):
        load_config("debug", ["data.task=2class", "data.test_task=3class"])
    with pytest.raises(
        ConfigError, match=r"^data\.unsure_range: must be \[low, high\] with 1 <= low <= high <= 5"
    ):
        load_config("debug", ["data.unsure_range=[3.5, 2.5]"])
    with pytest.raises(ConfigError, match=r"^data\.unsure_range"):
        load_config("debug", ["data.unsure_range=[0, 3]"])
    with pytest.raises(ConfigError, match=r"^data\.test_task: invalid value .4class."):
        load_config("debug", ["data.test_task=4class"])


def test_three_to_two_class_map_conditions_on_not_unsure():
    probs = np.array([[0.2, 0.6, 0.2], [0.1, 0.3, 0.6], [0.5, 0.45, 0.05], [0.0, 1.0, 0.0]])
    two = map_probabilities(probs, "3class", "2class")
    np.testing.assert_allclose(
        two, [[0.5, 0.5], [0.1 / 0.7, 0.6 / 0.7], [0.5 / 0.55, 0.05 / 0.55], [0.5, 0.5]]
    )
    np.testing.assert_allclose(two.sum(axis=1), 1.0)
    # The benign-vs-malignant order of the model is kept: the AUC is that of p(malignant) - p(benign)'s order.
    assert (np.argsort(two[:3, 1]) == np.argsort(probs[:3, 2] / (probs[:3, 0] + probs[:3, 2]))).all()
    assert map_probabilities(probs, "3class", "3class") is not None
    np.testing.assert_array_equal(map_probabilities(probs, "3class", "3class"), probs)
    with pytest.raises(ValueError, match="no unsure output"):
        map_probabilities(probs[:, :2], "2class", "3class")


def _band_store(path: str) -> NoduleStore:
    """14 patients x 2 nodules, 4 folds; malignancy cycling through the boundaries of both rules
    (period 7, so every fold meets unsure nodules of both)."""
    n = 28
    means = np.resize(np.array([2.0, 2.5, 8 / 3, 3.0, 10 / 3, 3.5, 4.0]), n).astype(np.float32)
    patient = np.repeat(np.arange(14), 2)
    return write_store(
        path,
        np.full((n, 16, 16, 16), 0.5, dtype=np.float32),
        fold=(patient % 4).astype(np.int8),
        attrs={"source": "synthetic", "patch_size": 16, "spacing_mm": 1.0, "hu_window": [-1000.0, 400.0]},
        label=label_from_malignancy(means),
        malignancy=means,
        attributes=np.full((n, 8), 3.0, dtype=np.float32),
        n_readers=np.full(n, 4, dtype=np.int8),
        diameter_mm=np.full(n, 6.0, dtype=np.float32),
        centroid_vox=np.zeros((n, 3), dtype=np.float32),
        patient_id=[f"B-{p:03d}" for p in patient],
        nodule_id=[f"B-{p:03d}/n{i % 2}" for i, p in enumerate(patient)],
        series_uid=[f"1.2.{p}" for p in patient],
    )


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_splits_and_test_rows_follow_the_setting(tmp_path: Path, name: str):
    """Training/validation rows follow the training task, test rows the test task, labels the
    setting's rule; the datasource's labels are the same (same function)."""
    from cliplung.data.ingest import _read_rows

    store = _band_store(str(tmp_path / "band"))
    setting = SETTINGS[name]
    cfg = load_config("debug", [f"data.store={store.path}", "data.val_fraction=0.25", *setting.overrides()])
    meta = store.read(("malignancy", "fold"))
    labels = label_from_malignancy(meta["malignancy"], setting.unsure_range)
    splits = compute_splits(store, cfg.data)
    trained = np.concatenate([splits.train, splits.val])
    if setting.task == "2class":
        assert (labels[trained] != 1).all()
    else:
        assert (labels[trained] == 1).any()
    test_unsure = (labels[splits.test] == 1).any()
    assert test_unsure == (setting.test_task == "3class")
    rows, y = fold_rows(store, 0, cfg.data.scored_task, cfg.data.unsure_range)
    np.testing.assert_array_equal(rows, splits.test)
    expected = (labels[rows] == 2).astype(int) if setting.test_task == "2class" else labels[rows]
    np.testing.assert_array_equal(y, expected)
    # The Ray datasource labels training rows with the same rule and task.
    block = next(_read_rows(store, cfg.data.task, cfg.data.unsure_range, splits.train))
    want = labels[splits.train]
    want = (want == 2).astype(int) if setting.task == "2class" else want
    np.testing.assert_array_equal(np.asarray(block["label"]), want)


def test_band_rule_moves_boundary_nodules_to_unsure(tmp_path: Path):
    store = _band_store(str(tmp_path / "band"))
    base = load_config("debug", [f"data.store={store.path}", "data.val_fraction=0.25"])
    band = apply_overrides(base, ["data.unsure_range=[2.5, 3.5]"])
    _, paper = fold_rows(store, 1, "3class")
    _, wide = fold_rows(store, 1, "3class", band.data.unsure_range)
    assert (wide == 1).sum() > (paper == 1).sum()
    assert len(compute_splits(store, apply_overrides(band, ["data.task=2class"]).data).train) < len(
        compute_splits(store, apply_overrides(base, ["data.task=2class"]).data).train
    )


def test_evaluate_three_class_model_on_two_classes(tmp_path: Path):
    """3 classes in training, benign vs malignant in test: unsure test nodules dropped, the
    model's probabilities conditioned on not unsure, the raw ones kept."""
    path = str(tmp_path / "syn")
    make_synthetic_store(path, n_patients=20)
    cfg = load_config("debug", [f"data.store={path}", *SETTINGS["3class-test2"].overrides()])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=cfg.data.num_classes, patch_size=16)
    ckpt = save_inference(model, cfg, tmp_path / "ck" / "model.pt")
    result = evaluate(ckpt, path, out_dir=tmp_path / "r")
    store = NoduleStore.open(path)
    rows3, _ = fold_rows(store, 0, "3class")
    assert result["class_names"] == ["benign", "malignant"] and result["train_task"] == "3class"
    assert result["setting"] == "3class-test2" and "conditioned on not unsure" in result["probabilities"]
    assert 0 < result["n"] < len(rows3)
    lines = (tmp_path / "r" / "predictions.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[-5:] == ["p_benign", "p_malignant", "model_p_benign", "model_p_unsure", "model_p_malignant"]
    for line in lines[1:]:
        values = line.split(",")
        p_b, p_m, raw_b, _raw_u, raw_m = (float(v) for v in values[-5:])
        assert p_b + p_m == pytest.approx(1.0, abs=2e-6)
        assert p_m == pytest.approx(raw_m / (raw_b + raw_m), abs=2e-6)
        assert values[3] in ("benign", "malignant")
