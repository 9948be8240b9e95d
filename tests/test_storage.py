"""cliplung.storage: location parsing, endpoint checks, atomic local commits."""

from __future__ import annotations

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
    assert storage.temporary_sibling("s3://b/store").startswith("s3://b/store.tmp-")


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


def test_credentials_come_from_environment_only(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    options = storage.s3_storage_options("http://localhost:9000")
    assert options["key"] == "AKIAEXAMPLE" and options["secret"] == "s3cr3t"
    assert options["endpoint_url"] == "http://localhost:9000"
    fs, path = storage.pyarrow_filesystem("s3://bucket/prefix", "http://localhost:9000")
    assert path == "bucket/prefix" and type(fs).__name__ == "S3FileSystem"


def test_local_commit_is_atomic_and_needs_overwrite(tmp_path):
    final = str(tmp_path / "out")
    tmp = storage.temporary_sibling(final)
    storage.write_text(storage.join(tmp, "data.txt"), "v1")
    with pytest.raises(storage.StorageError, match="no completion marker"):
        storage.commit(tmp, final, marker="_DONE")
    storage.write_text(storage.join(tmp, "_DONE"), "")
    storage.commit(tmp, final, marker="_DONE")
    assert storage.read_text(storage.join(final, "data.txt")) == "v1"
    assert not storage.exists(tmp)

    tmp2 = storage.temporary_sibling(final)
    storage.write_text(storage.join(tmp2, "data.txt"), "v2")
    storage.write_text(storage.join(tmp2, "_DONE"), "")
    with pytest.raises(storage.StorageError, match="already exists"):
        storage.commit(tmp2, final, marker="_DONE")
    storage.commit(tmp2, final, marker="_DONE", overwrite=True)
    assert storage.read_text(storage.join(final, "data.txt")) == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old-/.tmp- leftovers

    storage.rename(final, str(tmp_path / "moved"))
    assert storage.exists(str(tmp_path / "moved")) and not storage.exists(final)
    storage.rm(str(tmp_path / "moved"))
    assert not storage.exists(str(tmp_path / "moved"))
