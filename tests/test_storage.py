"""cliplung.storage: locations, endpoints, credentials never held, atomic and conditional writes,
transient-error retries (local; the S3 side runs against SeaweedFS in test_data_s3.py)."""

from __future__ import annotations

import errno
import os
import pickle
import socket

import pytest

from cliplung import storage


def test_parse_and_join(tmp_path):
    loc = storage.parse_location("s3://bucket/a/b/")
    assert (loc.scheme, loc.bucket, loc.key, loc.url) == ("s3", "bucket", "a/b", "s3://bucket/a/b")
    assert storage.parse_location(str(tmp_path)).path == str(tmp_path)
    assert storage.parse_location(f"file://{tmp_path}").path == str(tmp_path)
    assert storage.join("s3://bucket/a/", "b", "/c") == "s3://bucket/a/b/c"
    assert storage.join(str(tmp_path), "x") == str(tmp_path / "x")
    with pytest.raises(storage.StorageError, match="unsupported scheme 'gs'"):
        storage.parse_location("gs://bucket/x")
    with pytest.raises(storage.StorageError, match="expected s3://bucket/prefix"):
        storage.parse_location("s3://")


def test_endpoint_resolution_and_unreachable_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:9000")
    assert storage.resolve_endpoint(None) == "http://from-env:9000"
    assert storage.resolve_endpoint("http://arg:1") == "http://arg:1"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert storage.resolve_endpoint(None) is None
    with pytest.raises(storage.StorageError, match="expected a URL"):
        storage.resolve_endpoint("minio:9000")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on this port now
    with pytest.raises(storage.StorageError, match=f"S3 endpoint http://127.0.0.1:{port} is not reachable"):
        storage.check_endpoint(f"http://127.0.0.1:{port}", timeout=2)


def test_no_client_is_given_or_keeps_the_keys(monkeypatch):
    # The keys live in the environment; the SDK's default chain reads them when a request is
    # signed. Nothing built here holds them, so nothing that pickles a filesystem (Ray Tune's
    # tuner.pkl) can write them anywhere.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIADISTINCTIVE0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-distinctive-0001")
    options = storage.s3_storage_options("http://localhost:9000")
    assert options["endpoint_url"] == "http://localhost:9000"
    assert not {"key", "secret", "token"} & set(options)
    fs, path = storage.pyarrow_filesystem("s3://bucket/prefix", "http://localhost:9000")
    assert path == "bucket/prefix" and type(fs).__name__ == "S3FileSystem"
    for thing in (fs, storage.fsspec_filesystem("s3://bucket/x", "http://localhost:9000"), options):
        blob = pickle.dumps(thing)
        assert b"AKIADISTINCTIVE0001" not in blob and b"s3cr3t-distinctive-0001" not in blob


def test_local_writes_are_atomic_and_conditional(tmp_path, monkeypatch):
    target = str(tmp_path / "d" / "pointer")
    storage.write_bytes(target, b"one")
    data, tag = storage.read_tagged(target)
    assert data == b"one" and storage.read_tagged(str(tmp_path / "none")) == (None, None)

    # A crash while writing leaves the old content and at most a temporary sibling.
    real_replace = os.replace

    def crash(*args):
        raise OSError(errno.EIO, "power cut (injected)")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="injected"):
        storage.write_bytes(target, b"two")
    monkeypatch.setattr(os, "replace", real_replace)
    assert storage.read_bytes(target) == b"one" and os.listdir(tmp_path / "d") == ["pointer"]

    storage.replace_if(target, b"two", tag)
    with pytest.raises(storage.StorageConflict, match="changed while it was being replaced"):
        storage.replace_if(target, b"three", tag)  # the tag names "one", the file holds "two"
    with pytest.raises(storage.StorageConflict):
        storage.replace_if(target, b"three", None)  # None: only if absent
    storage.replace_if(str(tmp_path / "new"), b"x", None)
    assert storage.read_bytes(target) == b"two" and storage.read_bytes(str(tmp_path / "new")) == b"x"


def test_listing_and_removal(tmp_path):
    root = tmp_path / "r"
    storage.write_text(str(root / "a" / "b.txt"), "12345")
    storage.write_text(str(root / "c"), "1")
    (root / "empty" / "deeper").mkdir(parents=True)
    assert storage.list_objects(str(root)) == {"a/b.txt": 5, "c": 1}
    assert storage.list_entries(str(root)) == [("a", True), ("c", False), ("empty", True)]
    assert storage.has_objects(str(root / "a")) and not storage.has_objects(str(root / "empty"))
    assert storage.sha256_of(str(root / "c"))[0] == 1
    storage.rm(str(root / "a"))
    assert not storage.exists(str(root / "a"))
    with pytest.raises(storage.StorageError, match="whole bucket"):
        storage.rm("s3://bucket")


def _client_error(code: str, status: int):
    import botocore.exceptions

    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


def test_transient_errors_are_told_from_real_ones():
    import botocore.exceptions

    assert storage.is_transient(botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"))
    assert storage.is_transient(ConnectionResetError())
    assert storage.is_transient(_client_error("SlowDown", 503))
    assert storage.is_transient(_client_error("InternalError", 500))
    wrapped = OSError(errno.EIO, "s3fs translated it")
    wrapped.__cause__ = _client_error("ServiceUnavailable", 503)
    assert storage.is_transient(wrapped)
    assert not storage.is_transient(_client_error("NoSuchKey", 404))
    assert not storage.is_transient(_client_error("SignatureDoesNotMatch", 403))
    assert not storage.is_transient(FileNotFoundError("x"))
    assert not storage.is_transient(ValueError("x"))


def test_retry_rides_out_transient_errors_and_gives_up_naming_what(monkeypatch, caplog):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        return "ok"

    with caplog.at_level("WARNING", logger="cliplung.storage"):
        assert storage.retry(flaky, what="store s3://b/s: object patches/c/0") == "ok"
    assert [r.getMessage().split(";")[-1].strip()[:9] for r in caplog.records] == ["retry 1/7", "retry 2/7"]
    assert "store s3://b/s: object patches/c/0: ConnectionRefusedError" in caplog.records[0].getMessage()

    def down():
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    with pytest.raises(
        storage.StorageError, match=r"object patches/c/0: ConnectionRefusedError.*gave up after 8 attempts"
    ):
        storage.retry(down, what="store s3://b/s: object patches/c/0")

    def wrong():
        raise FileNotFoundError("no such object")

    calls["n"] = 0
    with pytest.raises(FileNotFoundError):  # not transient: at once, unchanged
        storage.retry(wrong, what="x")
