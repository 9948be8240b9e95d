"""cliplung.data.store: schema round trip, row reads, validation, atomic and refused writes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import zarr

from cliplung.config import ATTRIBUTES
from cliplung.data import store as store_mod
from cliplung.data.store import COMPLETION_MARKER, NoduleStore, StoreError, StoreWriter, write_store

P = 8


def _rows(n: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    malignancy = rng.choice([1.0, 2.5, 3.0, 3.25, 5.0], size=n).astype(np.float32)
    fields = {
        "label": store_mod.label_from_malignancy(malignancy).tolist(),
        "malignancy": malignancy.tolist(),
        "attributes": list(rng.uniform(1, 5, (n, len(ATTRIBUTES))).astype(np.float32)),
        "n_readers": rng.integers(1, 5, n).tolist(),
        "diameter_mm": rng.uniform(3, 30, n).tolist(),
        "centroid_vox": list(rng.uniform(0, 100, (n, 3)).astype(np.float32)),
        "patient_id": [f"LIDC-IDRI-{i // 2:04d}" for i in range(n)],
        "nodule_id": [f"LIDC-IDRI-{i // 2:04d}/n{i % 2 + 1:02d}" for i in range(n)],
        "series_uid": [f"1.2.3.{i // 2}" for i in range(n)],
    }
    return rng.uniform(0, 1, (n, P, P, P)).astype(np.float32), fields


def _fold(n: int) -> np.ndarray:
    return np.array([(i // 2) % 3 for i in range(n)], dtype=np.int8)


ATTRS = {"source": "test", "folds": 3, "seed": 0}


def test_round_trip_sharded_layout_and_reads(tmp_path):
    n = 150  # 3 shards of 64 (the last partial)
    patches, fields = _rows(n)
    store = write_store(
        str(tmp_path / "s"), patches, fold=_fold(n), attrs=ATTRS, config_yaml="name: t\n", **fields
    )
    assert store.num_nodules == n and store.attrs["patch_size"] == P and store.attrs["schema_version"] == 1
    store.validate()
    arr = store.array("patches")
    assert (
        arr.dtype == np.float16 and tuple(arr.chunks) == (1, P, P, P) and tuple(arr.shards) == (64, P, P, P)
    )
    shard_files = sorted(p.name for p in (tmp_path / "s" / "patches" / "c").iterdir())
    assert shard_files == ["0", "1", "2"]  # three objects for 150 nodules
    assert (tmp_path / "s" / "config.yaml").read_text() == "name: t\n"

    rows = store.read_rows(60, 70)
    np.testing.assert_allclose(rows["patches"], patches[60:70], atol=1e-3)  # float16
    assert rows["patient_id"].dtype.kind == "U" and rows["nodule_id"].tolist() == fields["nodule_id"][60:70]
    np.testing.assert_array_equal(rows["fold"], _fold(n)[60:70])
    picked = store.read(["label", "nodule_id"], [149, 3, 3, 70])
    assert picked["nodule_id"].tolist() == [fields["nodule_id"][i] for i in (149, 3, 3, 70)]
    with pytest.raises(StoreError, match="rows 140:151 out of range 0:150"):
        store.read_rows(140, 151)

    clone = pickle.loads(pickle.dumps(store))
    assert clone.num_nodules == n and clone.path == store.path


def test_overwrite_is_refused_without_flag_and_replaces_with_it(tmp_path):
    path = str(tmp_path / "s")
    patches, fields = _rows(4)
    write_store(path, patches, fold=_fold(4), attrs=ATTRS, **fields)
    with pytest.raises(StoreError, match=r"already exists; pass --overwrite"):
        write_store(path, patches, fold=_fold(4), attrs=ATTRS, **fields)
    patches2, fields2 = _rows(6, seed=1)
    assert write_store(path, patches2, fold=_fold(6), attrs=ATTRS, overwrite=True, **fields2).num_nodules == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_exception_mid_write_leaves_old_store_and_no_complete_build(tmp_path, monkeypatch):
    path = str(tmp_path / "s")
    patches, fields = _rows(4)
    write_store(path, patches, fold=_fold(4), attrs=ATTRS, **fields)

    calls = {"n": 0}
    real_append = zarr.Array.append

    def failing_append(self, data, axis=0):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (injected)")
        return real_append(self, data, axis=axis)

    monkeypatch.setattr(zarr.Array, "append", failing_append)
    patches, fields = _rows(200)
    with pytest.raises(OSError, match="injected"):
        write_store(path, patches, fold=_fold(200), attrs=ATTRS, overwrite=True, **fields)
    # The old store is untouched and the aborted build is gone.
    assert NoduleStore.open(path).num_nodules == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_killed_build_is_refused_as_incomplete(tmp_path, monkeypatch):
    path = str(tmp_path / "s")
    patches, fields = _rows(70)
    # A killed process runs no cleanup: make abort a no-op and fail half-way through the rows.
    monkeypatch.setattr(StoreWriter, "abort", lambda self: None)
    writer = StoreWriter(path, patch_size=P)
    with pytest.raises(RuntimeError, match="killed"), writer:
        writer.append(patches[:64], **{k: v[:64] for k, v in fields.items()})
        raise RuntimeError("killed")
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith("s.tmp-")]
    assert len(leftovers) == 1 and not (tmp_path / "s").exists()
    with pytest.raises(
        StoreError,
        match=r"is incomplete \(no completion marker\): a prepare was interrupted; rerun with --overwrite",
    ):
        NoduleStore.open(str(leftovers[0]))
    with pytest.raises(StoreError, match="no nodule store here"):
        NoduleStore.open(path)


def test_store_without_marker_is_refused(tmp_path):
    path = tmp_path / "s"
    patches, fields = _rows(3)
    write_store(str(path), patches, fold=_fold(3), attrs=ATTRS, **fields)
    (path / COMPLETION_MARKER).unlink()
    with pytest.raises(StoreError, match=rf"{path} is incomplete \(no completion marker\)"):
        NoduleStore.open(str(path))


@pytest.mark.parametrize(
    ("array", "value", "message"),
    [
        ("patches", np.nan, r"array 'patches' row 2 holds NaN or inf"),
        ("label", 7, r"array 'label' row 2: values must be 0, 1 or 2"),
        ("fold", 3, r"array 'fold' row 2: values must be in 0..2"),
        ("malignancy", 4.0, r"array 'label' row 2: disagrees with malignancy"),
        ("n_readers", 0, r"array 'n_readers' row 2: values must be >= 1"),
    ],
)
def test_validate_names_store_and_array(tmp_path, array, value, message):
    path = tmp_path / "s"
    patches, fields = _rows(6)
    fields["malignancy"] = [2.0] * 6
    fields["label"] = [0] * 6
    write_store(str(path), patches, fold=_fold(6), attrs=ATTRS, **fields)
    group = zarr.open_group(str(path), mode="r+")
    group[array][2] = value
    with pytest.raises(StoreError, match=rf"store {path}: {message}"):
        NoduleStore.open(str(path)).validate()


def test_validate_catches_patient_split_across_folds_and_length_mismatch(tmp_path):
    path = tmp_path / "s"
    patches, fields = _rows(6)
    fold = _fold(6)
    fold[1] = (fold[0] + 1) % 3  # rows 0 and 1 are the same patient
    write_store(str(path), patches, fold=fold, attrs=ATTRS, **fields)
    with pytest.raises(StoreError, match=r"array 'fold': patient LIDC-IDRI-0000 is in folds"):
        NoduleStore.open(str(path)).validate()
    zarr.open_group(str(path), mode="r+")["label"].resize((5,))
    with pytest.raises(StoreError, match=r"array 'label' has shape \(5,\), expected \(6,\)"):
        NoduleStore.open(str(path)).validate()


def test_append_rejects_bad_rows(tmp_path):
    patches, fields = _rows(2)
    with StoreWriter(str(tmp_path / "s"), patch_size=P) as writer:
        with pytest.raises(StoreError, match=r"patches must have shape \(n, 8, 8, 8\)"):
            writer.append(patches[:, :4], **fields)
        with pytest.raises(StoreError, match="finite and within"):
            writer.append(patches * 2, **fields)
        with pytest.raises(StoreError, match=r"missing \['series_uid'\]"):
            writer.append(patches, **{k: v for k, v in fields.items() if k != "series_uid"})
        writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_data_modules_import_no_ray():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import cliplung.data, cliplung.data.store, cliplung.data.dicom, cliplung.data.lidc, cliplung.data.phantom\n"
        "import cliplung.data.prepare, cliplung.data.inspect, cliplung.storage\n"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
