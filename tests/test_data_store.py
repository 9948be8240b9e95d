"""cliplung.data.store on local disk: schema round trip, row reads, validation, versioned commits
that never lose the last good store, what may be replaced, integrity checks by object."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr

from cliplung import storage
from cliplung.config import ATTRIBUTES
from cliplung.data import store as store_mod
from cliplung.data.store import (
    COMPLETION_MARKER,
    POINTER,
    NoduleStore,
    StoreError,
    StoreWriter,
    describe_target,
    write_store,
)

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


def _write(path, n: int = 4, seed: int = 0, **kwargs) -> NoduleStore:
    patches, fields = _rows(n, seed)
    return write_store(str(path), patches, fold=_fold(n), attrs=ATTRS, **kwargs, **fields)


def _versions(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("v-"))


def _reseal(store: NoduleStore) -> None:
    """Rewrite the marker's manifest from what is on disk now, as if buggy code had written the
    store that way (content checks are then all that can catch it)."""
    import hashlib

    root = Path(store.root)
    marker = json.loads((root / COMPLETION_MARKER).read_text())
    marker["objects"] = {
        str(p.relative_to(root)): [p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()]
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != COMPLETION_MARKER
    }
    (root / COMPLETION_MARKER).write_text(json.dumps(marker))


class Killed(BaseException):
    """A process death stand-in: not an Exception, so no cleanup code catches it."""


def test_round_trip_sharded_layout_and_reads(tmp_path):
    n = 150  # 3 shards of 64 (the last partial)
    patches, fields = _rows(n)
    store = write_store(
        str(tmp_path / "s"), patches, fold=_fold(n), attrs=ATTRS, config_yaml="name: t\n", **fields
    )
    assert store.num_nodules == n and store.attrs["patch_size"] == P and store.attrs["schema_version"] == 2
    store.validate()
    arr = store.array("patches")
    assert (
        arr.dtype == np.float16 and tuple(arr.chunks) == (1, P, P, P) and tuple(arr.shards) == (64, P, P, P)
    )
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [POINTER, store.version]
    root = Path(store.root)
    assert sorted(p.name for p in (root / "patches" / "c").iterdir()) == ["0", "1", "2"]  # 3 objects
    assert store.read_config() == "name: t\n"
    # The marker lists every object of the version with its size and SHA-256.
    listed = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {COMPLETION_MARKER}
    assert set(store.objects) == listed and "patches/c/2/0/0/0" in listed and "config.yaml" in listed
    assert store.verify()["objects"] == len(listed)

    rows = store.read_rows(60, 70)
    np.testing.assert_allclose(rows["patches"], patches[60:70], atol=1e-3)  # float16
    assert rows["patient_id"].dtype.kind == "U" and rows["nodule_id"].tolist() == fields["nodule_id"][60:70]
    np.testing.assert_array_equal(rows["fold"], _fold(n)[60:70])
    picked = store.read(["label", "nodule_id"], [149, 3, 3, 70])
    assert picked["nodule_id"].tolist() == [fields["nodule_id"][i] for i in (149, 3, 3, 70)]
    with pytest.raises(StoreError, match="rows 140:151 out of range 0:150"):
        store.read_rows(140, 151)

    clone = pickle.loads(pickle.dumps(store))
    assert clone.num_nodules == n and clone.path == store.path and clone.version == store.version


def test_overwrite_is_refused_without_flag_and_keeps_one_previous_version(tmp_path):
    path = tmp_path / "s"
    first = _write(path)
    with pytest.raises(
        StoreError,
        match=rf"{path} already holds a nodule store \(version {first.version}\); pass --overwrite",
    ):
        _write(path)
    second = _write(path, n=6, seed=1, overwrite=True)
    assert second.num_nodules == 6 and NoduleStore.open(str(path)).version == second.version
    assert _versions(path) == sorted([first.version, second.version])  # the replaced one stays
    third = _write(path, n=2, seed=2, overwrite=True)
    assert _versions(path) == sorted([second.version, third.version])
    assert json.loads((path / POINTER).read_text())["previous"] == second.version


def test_readers_keep_the_version_they_opened_through_one_replacement(tmp_path):
    path = tmp_path / "s"
    old = _write(path, n=6, seed=0)
    old_rows = old.read_rows(0, 6, ["patches", "nodule_id"])
    travelling = pickle.loads(pickle.dumps(old))  # what a Ray task gets
    _write(path, n=4, seed=1, overwrite=True)

    assert NoduleStore.open(str(path)).num_nodules == 4
    for reader in (old, travelling):
        again = reader.read_rows(0, 6, ["patches", "nodule_id"])
        np.testing.assert_array_equal(again["patches"], old_rows["patches"])

    # The next replacement removes that version: its readers get an error naming the object,
    # never zeros.
    _write(path, n=3, seed=2, overwrite=True)
    fresh = pickle.loads(pickle.dumps(old))
    with pytest.raises(StoreError, match=rf"version {old.version} is gone: later commits removed it"):
        fresh.read_rows(0, 6, ["patches"])


def test_exception_mid_write_leaves_old_store_and_no_partial_version(tmp_path, monkeypatch):
    path = tmp_path / "s"
    old = _write(path)

    calls = {"n": 0}
    real_append = zarr.Array.append

    def failing_append(self, data, axis=0):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (injected)")
        return real_append(self, data, axis=axis)

    monkeypatch.setattr(zarr.Array, "append", failing_append)
    with pytest.raises(OSError, match="injected"):
        _write(path, n=200, overwrite=True)
    assert NoduleStore.open(str(path)).version == old.version
    assert _versions(path) == [old.version] and sorted(os.listdir(path)) == [POINTER, old.version]


@pytest.mark.parametrize("step", ["after_marker", "pointer_temp_file", "after_pointer", "mid_cleanup"])
def test_a_commit_killed_at_any_step_leaves_a_store_that_opens(tmp_path, monkeypatch, step):
    path = tmp_path / "s"
    old = _write(path, n=4, seed=0)
    second = _write(path, n=5, seed=1, overwrite=True)  # so that a cleanup has an old version to remove
    monkeypatch.setattr(StoreWriter, "abort", lambda self: None)  # a dead process cleans nothing

    real_write_bytes, real_rm = storage.write_bytes, storage.rm

    def write_bytes(location, data, endpoint=None):
        if step == "pointer_temp_file" and location.endswith(POINTER):
            # Die after the temporary file is written, before os.replace moves it into place.
            tmp = f"{location}.tmp-killed"
            Path(tmp).write_bytes(data)
            raise Killed
        real_write_bytes(location, data, endpoint)
        if step == "after_pointer" and location.endswith(POINTER):
            raise Killed

    def rm(location, endpoint=None, **kwargs):
        if step == "mid_cleanup":
            raise Killed
        real_rm(location, endpoint, **kwargs)

    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    monkeypatch.setattr(storage, "rm", rm)
    patches, fields = _rows(6, seed=2)
    writer = StoreWriter(str(path), patch_size=P, overwrite=True)
    with pytest.raises(Killed):
        writer.append(patches, **fields)
        writer.finish(fold=_fold(6), attrs=ATTRS)
        if step == "after_marker":
            raise Killed
        writer.publish()
    monkeypatch.undo()

    opened = NoduleStore.open(str(path))
    expected = {"after_marker": 5, "pointer_temp_file": 5, "after_pointer": 6, "mid_cleanup": 6}[step]
    assert opened.num_nodules == expected
    opened.validate()
    # The next commit cleans up whatever the dead one left behind.
    latest = _write(path, n=3, seed=3, overwrite=True)
    assert sorted(os.listdir(path)) == sorted([POINTER, opened.version, latest.version])
    assert old.version not in os.listdir(path)
    del second


def test_a_failed_publish_keeps_the_new_version_and_says_where(tmp_path, monkeypatch):
    path = tmp_path / "s"
    old = _write(path)

    def broken(*args, **kwargs):
        raise PermissionError("read-only file system (injected)")

    monkeypatch.setattr(storage, "replace_if", broken)
    patches, fields = _rows(6, seed=1)
    with StoreWriter(str(path), patch_size=P, overwrite=True) as writer:
        writer.append(patches, **fields)
        version = writer.finish(fold=_fold(6), attrs=ATTRS)
        with pytest.raises(StoreError) as info:
            writer.publish()
    message = str(info.value)
    assert "injected" in message and f"kept at {path / version}" in message
    assert f"still serves {old.version}" in message and "--resume" in message
    monkeypatch.undo()
    assert NoduleStore.open(str(path)).version == old.version
    kept = NoduleStore.open(str(path), version=version)  # complete, committable
    assert kept.num_nodules == 6
    store_mod.publish(str(path), version)
    assert NoduleStore.open(str(path)).version == version


def test_two_commits_racing_for_one_store_do_not_lose_either(tmp_path):
    path = tmp_path / "s"
    _write(path)
    patches, fields = _rows(6, seed=1)
    a = StoreWriter(str(path), patch_size=P, overwrite=True)
    b = StoreWriter(str(path), patch_size=P, overwrite=True)
    for writer in (a, b):
        writer.append(patches, **fields)
        writer.finish(fold=_fold(6), attrs=ATTRS)
    a.publish()
    with pytest.raises(StoreError, match=rf"another commit changed the store .*kept at {path / b.version}"):
        b.publish()
    assert NoduleStore.open(str(path)).version == a.version
    assert NoduleStore.open(str(path), version=b.version).num_nodules == 6


def test_only_what_is_ours_may_be_replaced(tmp_path):
    # A folder of the user's: refused with or without --overwrite, untouched.
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(
            StoreError, match=rf"{user} holds 'thesis.tex', which is not part of a nodule store"
        ):
            _write(user, overwrite=overwrite)
    assert sorted(os.listdir(user)) == ["thesis.tex"] and (user / "thesis.tex").read_text() == "precious"
    with pytest.raises(StoreError, match=rf"{user} is not a nodule store \(it holds 'thesis.tex'\)"):
        NoduleStore.open(str(user))

    # A store of ours with a stranger inside is no longer only ours.
    store = tmp_path / "s"
    _write(store)
    (store / "notes").mkdir()
    (store / "notes" / "a.txt").write_text("x")
    with pytest.raises(StoreError, match=r"holds 'notes/'"):
        _write(store, overwrite=True)

    # A file, an empty folder, nothing.
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="a file"):
        _write(tmp_path / "f", overwrite=True)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert describe_target(str(tmp_path / "empty")).kind == "empty"
    assert _write(tmp_path / "empty").num_nodules == 4
    assert describe_target(str(tmp_path / "nothing")).kind == "absent"
    with pytest.raises(StoreError, match="no nodule store here"):
        NoduleStore.open(str(tmp_path / "nothing"))


def _legacy_store(path: Path) -> None:
    """A store as schema version 1 wrote it: one flat group with a marker, no pointer."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("patches", shape=(1, P, P, P), dtype=np.float16)
    group.attrs.update({"schema_version": 1, "completion_marker": COMPLETION_MARKER})
    (path / COMPLETION_MARKER).write_text('{"schema_version": 1}\n')
    (path / "config.yaml").write_text("x: 1\n")


def test_a_schema_1_store_is_named_and_replaceable(tmp_path):
    path = tmp_path / "old"
    _legacy_store(path)
    assert describe_target(str(path)).kind == "legacy"
    with pytest.raises(
        StoreError, match=r"schema version 1 .*rebuild it with `cliplung prepare --out .* --overwrite`"
    ):
        NoduleStore.open(str(path))
    with pytest.raises(StoreError, match="already holds a nodule store"):
        _write(path)
    new = _write(path, overwrite=True)
    assert sorted(os.listdir(path)) == [POINTER, new.version]  # the old layout is gone after the commit

    # Schema-1 names that are not a store of ours are someone else's.
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("mine: true\n")
    with pytest.raises(StoreError, match=r"holds 'config\.yaml'"):
        _write(other, overwrite=True)


def test_missing_truncated_and_damaged_objects_are_refused_by_name(tmp_path):
    path = tmp_path / "s"
    store = _write(path, n=130)
    root = Path(store.root)
    shard = root / "patches" / "c" / "1" / "0" / "0" / "0"

    data = shard.read_bytes()
    opened_before = NoduleStore.open(str(path))
    shard.write_bytes(data[:-7])
    with pytest.raises(
        StoreError, match=r"object patches/c/1/0/0/0 returned \d+ bytes where the completion marker"
    ):
        opened_before.read_rows(64, 70, ["patches"])
    with pytest.raises(
        StoreError,
        match=rf"object patches/c/1/0/0/0 has {len(data) - 7} bytes, the completion marker records {len(data)}",
    ):
        NoduleStore.open(str(path))

    shard.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # same size, other content
    damaged = NoduleStore.open(str(path))  # presence and sizes are all open checks
    with pytest.raises(
        StoreError, match=r"object patches/c/1/0/0/0 has SHA-256 \w+\.\.\., the completion marker records"
    ):
        damaged.validate()

    shard.unlink()
    with pytest.raises(
        StoreError, match=r"object patches/c/1/0/0/0 is missing \(the completion marker records"
    ):
        NoduleStore.open(str(path))
    # A reader that opened the store before the object went away gets the same error, not zeros.
    shard.write_bytes(data)
    reader = NoduleStore.open(str(path))
    shard.unlink()
    with pytest.raises(StoreError, match=r"object patches/c/1/0/0/0 is missing"):
        reader.read_rows(64, 70, ["patches"])
    (root / "label" / "c" / "0").unlink()
    with pytest.raises(StoreError, match=r"object label/c/0 is missing"):
        reader.read_rows(0, 3, ["label"])


def test_schema_attributes_are_checked_on_open(tmp_path, monkeypatch):
    for attr, value in (
        ("CLASS_NAMES", ("benign", "malignant", "unsure")),
        ("LABEL_RULE", "mean >= 3: malignant"),
    ):
        with monkeypatch.context() as m:
            m.setattr(store_mod, attr, value)
            _write(tmp_path / attr)
        name = attr.lower()
        with pytest.raises(StoreError, match=rf"attribute '{name}' is .*, this cliplung expects"):
            NoduleStore.open(str(tmp_path / attr))
    with monkeypatch.context() as m:
        m.setattr(store_mod, "ATTRIBUTES", tuple(reversed(ATTRIBUTES)))
        _write(tmp_path / "order")
    with pytest.raises(StoreError, match=r"attribute 'attributes' is \['texture'"):
        NoduleStore.open(str(tmp_path / "order"))


def test_a_killed_build_leaves_only_a_partial_version_that_nothing_reads(tmp_path, monkeypatch):
    path = tmp_path / "s"
    patches, fields = _rows(70)
    monkeypatch.setattr(StoreWriter, "abort", lambda self: None)
    writer = StoreWriter(str(path), patch_size=P)
    with pytest.raises(Killed), writer:
        writer.append(patches[:64], **{k: v[:64] for k, v in fields.items()})
        raise Killed
    assert _versions(path) == [writer.version] and not (path / POINTER).exists()
    assert describe_target(str(path)).kind == "builds"
    with pytest.raises(StoreError, match="holds no committed nodule store, only an unfinished build"):
        NoduleStore.open(str(path))
    with pytest.raises(StoreError, match="no completion marker"):
        NoduleStore.open(str(path), version=writer.version)
    monkeypatch.undo()
    new = _write(path)  # no --overwrite needed: nothing was committed; the next commit cleans up
    assert sorted(os.listdir(path)) == [POINTER, new.version]


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
    store = write_store(str(path), patches, fold=_fold(6), attrs=ATTRS, **fields)
    group = zarr.open_group(store.root, mode="r+")
    group[array][2] = value
    _reseal(store)
    with pytest.raises(StoreError, match=rf"store {path}: {message}"):
        NoduleStore.open(str(path)).validate()


def test_validate_catches_patient_split_across_folds(tmp_path):
    path = tmp_path / "s"
    patches, fields = _rows(6)
    fold = _fold(6)
    fold[1] = (fold[0] + 1) % 3  # rows 0 and 1 are the same patient
    write_store(str(path), patches, fold=fold, attrs=ATTRS, **fields)
    with pytest.raises(StoreError, match=r"array 'fold': patient LIDC-IDRI-0000 is in folds"):
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
    assert list((tmp_path / "s").iterdir()) == []


def test_data_modules_import_no_ray():
    from probes import modules_imported_by

    loaded = modules_imported_by(
        "import cliplung.data, cliplung.data.store, cliplung.data.dicom, cliplung.data.lidc, cliplung.data.phantom\n"
        "import cliplung.data.prepare, cliplung.data.inspect, cliplung.storage"
    )
    assert not [m for m in loaded if m == "ray" or m.startswith("ray.")], "ray imported"
