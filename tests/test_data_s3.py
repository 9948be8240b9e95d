"""Nodule stores on a real S3 server (SeaweedFS, tests/s3server.py): round trip, prepare and
inspect, commits that never lose the last good store (outage, kill, race), what may be replaced,
missing and damaged objects, wrong credentials."""

from __future__ import annotations

import json
import pickle
import socket
import uuid

import numpy as np
import pytest
from s3server import BUCKET
from test_data_store import ATTRS, Killed, P, _fold, _rows

from cliplung import cli, storage
from cliplung.config import load_config
from cliplung.data import store as store_mod
from cliplung.data.inspect import inspect_store
from cliplung.data.prepare import prepare_store
from cliplung.data.store import COMPLETION_MARKER, POINTER, NoduleStore, StoreError, StoreWriter, write_store

# Tests that run a server are "slow" by the project's definition.
pytestmark = pytest.mark.slow


@pytest.fixture
def prefix(s3_server):
    """A fresh key prefix per test (all tests share the session's bucket)."""
    return f"t-{uuid.uuid4().hex[:10]}"


def _write(url: str, endpoint: str, n: int = 5, seed: int = 0, **kwargs) -> NoduleStore:
    patches, fields = _rows(n, seed)
    return write_store(url, patches, fold=_fold(n), attrs=ATTRS, endpoint=endpoint, **kwargs, **fields)


def _versions(server, prefix: str) -> list[str]:
    names = {k[len(prefix) + 1 :].split("/")[0] for k in server.keys(f"{prefix}/")}
    return sorted(n for n in names if n.startswith("v-"))


def test_round_trip_on_s3(s3_server, prefix):
    url = f"s3://{BUCKET}/{prefix}/roundtrip"
    patches, fields = _rows(70)
    store = write_store(
        url, patches, fold=_fold(70), attrs=ATTRS, endpoint=s3_server.url, config_yaml="x: 1\n", **fields
    )
    store.validate()
    rows = store.read_rows(60, 70)
    np.testing.assert_allclose(rows["patches"], patches[60:70], atol=1e-3)
    assert rows["nodule_id"].tolist() == fields["nodule_id"][60:70]
    keys = s3_server.keys(f"{prefix}/roundtrip/")
    version = f"{prefix}/roundtrip/{store.version}"
    assert f"{prefix}/roundtrip/{POINTER}" in keys and f"{version}/{COMPLETION_MARKER}" in keys
    assert [k for k in keys if "/patches/c/" in k] == [
        f"{version}/patches/c/0/0/0/0",
        f"{version}/patches/c/1/0/0/0",
    ]
    assert set(store.objects) == {k[len(version) + 1 :] for k in keys if k.startswith(version)} - {
        COMPLETION_MARKER
    }
    assert store.read_config() == "x: 1\n"
    assert (
        pickle.loads(pickle.dumps(store)).read_rows(0, 2, ["label"])["label"].tolist() == fields["label"][:2]
    )
    fs, root = storage.pyarrow_filesystem(url, s3_server.url)
    assert fs.get_file_info(f"{root}/{POINTER}").size > 0


def test_prepare_and_inspect_on_s3_with_endpoint_from_env(s3_server, prefix, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    url = f"s3://{BUCKET}/{prefix}/phantom"
    config = load_config("debug", ["prepare.limit=2", "prepare.folds=2"])
    summary = prepare_store(config, url, progress=False, executor="serial")
    assert summary.store == url and summary.nodules > 0
    store = NoduleStore.open(url)
    store.validate()
    assert store.num_nodules == summary.nodules and store.attrs["source"] == "phantom"
    assert "prepare:" in store.read_config()
    assert not [k for k in s3_server.keys(f"{prefix}/") if "/_builds/" in k]  # the build's results are gone
    text, ok = inspect_store(url, png_out=str(tmp_path / "m.png"), verify=True)
    assert ok and f"{summary.nodules} nodules" in text and "sizes and SHA-256" in text
    assert (tmp_path / "m.png").stat().st_size > 0


def test_an_outage_during_the_commit_keeps_the_last_good_store(s3_server, prefix, monkeypatch):
    url = f"s3://{BUCKET}/{prefix}/outage"
    old = _write(url, s3_server.url)
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 2)  # give up in seconds, not half a minute
    patches, fields = _rows(7, seed=1)
    writer = StoreWriter(url, patch_size=P, overwrite=True, endpoint=s3_server.url)
    writer.append(patches, **fields)
    version = writer.finish(fold=_fold(7), attrs=ATTRS)
    s3_server.stop()
    try:
        with pytest.raises(StoreError) as info:
            writer.publish()
    finally:
        s3_server.start()
    message = str(info.value)
    assert f"kept at {url}/{version}" in message and f"still serves {old.version}" in message, message
    assert "--resume" in message and "EndpointConnectionError" in message
    assert NoduleStore.open(url, endpoint=s3_server.url).version == old.version
    store_mod.publish(url, version, endpoint=s3_server.url)  # what --resume does for a finished build
    assert NoduleStore.open(url, endpoint=s3_server.url).num_nodules == 7


@pytest.mark.parametrize("when", ["before_pointer", "after_pointer"])
def test_a_killed_commit_leaves_a_store_that_opens(s3_server, prefix, monkeypatch, when):
    url = f"s3://{BUCKET}/{prefix}/killed"
    old = _write(url, s3_server.url)
    real = storage.replace_if

    def dying(location, data, tag, endpoint=None):
        if when == "after_pointer":
            real(location, data, tag, endpoint)
        raise Killed

    monkeypatch.setattr(storage, "replace_if", dying)
    with pytest.raises(Killed):
        _write(url, s3_server.url, n=8, seed=1, overwrite=True)
    monkeypatch.undo()
    opened = NoduleStore.open(url, endpoint=s3_server.url)
    assert opened.num_nodules == (5 if when == "before_pointer" else 8)
    opened.validate()
    assert len(_versions(s3_server, f"{prefix}/killed")) == 2  # no cleanup ran
    latest = _write(url, s3_server.url, n=3, overwrite=True)
    assert _versions(s3_server, f"{prefix}/killed") == sorted([opened.version, latest.version])
    del old


def test_readers_keep_their_version_while_the_store_is_replaced_on_s3(s3_server, prefix):
    url = f"s3://{BUCKET}/{prefix}/readers"
    old = _write(url, s3_server.url, n=6)
    before = old.read_rows(0, 6, ["patches"])["patches"]
    travelling = pickle.loads(pickle.dumps(old))
    _write(url, s3_server.url, n=4, seed=1, overwrite=True)
    assert NoduleStore.open(url, endpoint=s3_server.url).num_nodules == 4
    np.testing.assert_array_equal(travelling.read_rows(0, 6, ["patches"])["patches"], before)
    np.testing.assert_array_equal(old.read_rows(0, 6, ["patches"])["patches"], before)


def test_two_racing_commits_on_s3_are_refused_by_the_conditional_write(s3_server, prefix):
    url = f"s3://{BUCKET}/{prefix}/race"
    _write(url, s3_server.url)
    patches, fields = _rows(6, seed=1)
    a = StoreWriter(url, patch_size=P, overwrite=True, endpoint=s3_server.url)
    b = StoreWriter(url, patch_size=P, overwrite=True, endpoint=s3_server.url)
    for writer in (a, b):
        writer.append(patches, **fields)
        writer.finish(fold=_fold(6), attrs=ATTRS)
    a.publish()
    with pytest.raises(StoreError, match=rf"another commit changed the store .*kept at {url}/{b.version}"):
        b.publish()
    assert NoduleStore.open(url, endpoint=s3_server.url).version == a.version


def test_only_what_is_ours_is_replaced_on_s3(s3_server, prefix):
    runs = f"{prefix}/runs"
    s3_server.put(f"{runs}/exp1/model.pt", b"weights")
    with pytest.raises(
        StoreError, match=rf"s3://{BUCKET}/{runs} holds 'exp1/', which is not part of a nodule store"
    ):
        _write(f"s3://{BUCKET}/{runs}", s3_server.url, overwrite=True)
    assert s3_server.keys(f"{runs}/") == [f"{runs}/exp1/model.pt"]
    s3_server.put(f"{prefix}/object", b"x")
    with pytest.raises(StoreError, match=r"an object \(not a prefix\)"):
        _write(f"s3://{BUCKET}/{prefix}/object", s3_server.url, overwrite=True)
    with pytest.raises(StoreError, match=rf"s3://{BUCKET}: a bucket root cannot be a nodule store"):
        _write(f"s3://{BUCKET}", s3_server.url, overwrite=True)
    # SeaweedFS keeps listing a prefix as a folder after its last object is gone: that folder is
    # empty, not someone's data.
    s3_server.delete_prefix(f"{runs}/")
    assert _write(f"s3://{BUCKET}/{runs}", s3_server.url).num_nodules == 5


def test_missing_truncated_and_damaged_objects_on_s3_are_refused_by_name(s3_server, prefix):
    url = f"s3://{BUCKET}/{prefix}/damaged"
    store = _write(url, s3_server.url, n=70)
    key = f"{prefix}/damaged/{store.version}/patches/c/1/0/0/0"
    data = s3_server.read(key)
    reader = NoduleStore.open(url, endpoint=s3_server.url)

    s3_server.put(key, data[:-9])
    with pytest.raises(
        StoreError,
        match=rf"object patches/c/1/0/0/0 has {len(data) - 9} bytes, the completion marker records {len(data)}",
    ):
        NoduleStore.open(url, endpoint=s3_server.url)
    with pytest.raises(
        StoreError, match=r"object patches/c/1/0/0/0 returned \d+ bytes where the completion marker implies"
    ):
        reader.read_rows(64, 70, ["patches"])

    s3_server.put(key, bytes([data[0] ^ 0xFF]) + data[1:])
    with pytest.raises(StoreError, match=r"object patches/c/1/0/0/0 has SHA-256 .* its content is damaged"):
        NoduleStore.open(url, endpoint=s3_server.url).validate()
    assert cli.main(["inspect", url, "--verify", "--storage-endpoint", s3_server.url]) == 2

    s3_server.client().delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(
        StoreError, match=r"object patches/c/1/0/0/0 is missing \(the completion marker records"
    ):
        NoduleStore.open(url, endpoint=s3_server.url)
    with pytest.raises(StoreError, match=r"object patches/c/1/0/0/0 is missing"):
        reader.read_rows(64, 70, ["patches"])  # never zeros


def test_the_pointer_is_plain_json_naming_a_version(s3_server, prefix):
    url = f"s3://{BUCKET}/{prefix}/pointer"
    first = _write(url, s3_server.url)
    second = _write(url, s3_server.url, overwrite=True)
    pointer = json.loads(s3_server.read(f"{prefix}/pointer/{POINTER}"))
    assert pointer["version"] == second.version and pointer["previous"] == first.version


def test_wrong_credentials_are_refused_naming_the_endpoint(s3_server, prefix, monkeypatch, capsys):
    url = f"s3://{BUCKET}/{prefix}/creds"
    _write(url, s3_server.url)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(
        storage.StorageError,
        match=rf"S3 endpoint {s3_server.url} refused the credentials \(SignatureDoesNotMatch",
    ):
        NoduleStore.open(url, endpoint=s3_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY")
    assert cli.main(["inspect", url, "--storage-endpoint", s3_server.url]) == 2
    err = capsys.readouterr().err
    assert f"S3 endpoint {s3_server.url} refused the credentials (InvalidAccessKeyId" in err
    assert "not-the-secret" not in err


def test_unreachable_endpoint_is_named():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(storage.StorageError, match=rf"S3 endpoint http://127.0.0.1:{port} is not reachable"):
        NoduleStore.open(f"s3://{BUCKET}/x", endpoint=f"http://127.0.0.1:{port}")
