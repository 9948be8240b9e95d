"""Nodule stores on S3, against a local moto server: round trip, prepare + inspect, markers."""

from __future__ import annotations

import logging
import pickle
import socket

import numpy as np
import pytest
from test_data_store import ATTRS, P, _fold, _rows

from cliplung import storage
from cliplung.config import load_config
from cliplung.data.inspect import inspect_store
from cliplung.data.prepare import prepare_store
from cliplung.data.store import COMPLETION_MARKER, NoduleStore, StoreError, write_store

BUCKET = "cliplung-test"

# A moto server per module: "slow" by the project's definition (tests that run servers).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 with test credentials in the environment.

    Port 0 lets the OS hand out a free port atomically when the server binds, so there is no
    window for another process to take it; a failed start is retried all the same.
    """
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            mp.setenv(key, value)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        server = None
        for attempt in range(5):
            try:
                server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
                server.start()
                break
            except OSError:
                if attempt == 4:
                    raise
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        try:
            yield url
        finally:
            server.stop()


def _objects(url: str, prefix: str) -> list[str]:
    fs = storage.fsspec_filesystem(f"s3://{BUCKET}", url)
    return sorted(p[len(f"{BUCKET}/{prefix}/") :] for p in fs.find(f"{BUCKET}/{prefix}"))


def test_round_trip_on_s3(s3_endpoint):
    path = f"s3://{BUCKET}/stores/roundtrip"
    patches, fields = _rows(70)
    store = write_store(
        path, patches, fold=_fold(70), attrs=ATTRS, endpoint=s3_endpoint, config_yaml="x: 1\n", **fields
    )
    store.validate()
    rows = store.read_rows(60, 70)
    np.testing.assert_allclose(rows["patches"], patches[60:70], atol=1e-3)
    assert rows["nodule_id"].tolist() == fields["nodule_id"][60:70]
    objects = _objects(s3_endpoint, "stores/roundtrip")
    assert COMPLETION_MARKER in objects and "config.yaml" in objects
    assert [o for o in objects if o.startswith("patches/c/")] == ["patches/c/0/0/0/0", "patches/c/1/0/0/0"]
    assert not any(o.startswith("stores/roundtrip.tmp-") for o in _objects(s3_endpoint, "stores"))
    assert pickle.loads(pickle.dumps(store)).num_nodules == 70
    fs, root = storage.pyarrow_filesystem(path, s3_endpoint)
    assert fs.get_file_info(f"{root}/{COMPLETION_MARKER}").size > 0


def test_prepare_and_inspect_on_s3_with_endpoint_from_env(s3_endpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    path = f"s3://{BUCKET}/stores/phantom"
    config = load_config("debug", ["prepare.limit=2", "prepare.folds=2"])
    summary = prepare_store(config, path, progress=False)
    assert summary.store == path and summary.nodules > 0
    store = NoduleStore.open(path)
    store.validate()
    assert store.num_nodules == summary.nodules and store.attrs["source"] == "phantom"
    assert "prepare:" in storage.read_text(storage.join(path, "config.yaml"))
    text = inspect_store(path, png_out=str(tmp_path / "m.png"))
    assert f"{summary.nodules} nodules" in text and (tmp_path / "m.png").stat().st_size > 0


def test_completion_marker_decides_on_s3(s3_endpoint, monkeypatch):
    path = f"s3://{BUCKET}/stores/marker"
    patches, fields = _rows(5)
    write_store(path, patches, fold=_fold(5), attrs=ATTRS, endpoint=s3_endpoint, **fields)
    with pytest.raises(StoreError, match="already exists; pass --overwrite"):
        write_store(path, patches, fold=_fold(5), attrs=ATTRS, endpoint=s3_endpoint, **fields)

    # A commit that dies after copying the objects but before the marker: the prefix holds every
    # array, yet it must not open as complete.
    real_filesystem = storage.fsspec_filesystem

    class DiesBeforeMarker:
        def __init__(self, fs):
            self._fs = fs

        def __getattr__(self, name):
            return getattr(self._fs, name)

        def copy(self, path1, path2, *args, **kwargs):
            if str(path1).endswith(COMPLETION_MARKER):
                raise OSError("connection reset (injected)")
            return self._fs.copy(path1, path2, *args, **kwargs)

    monkeypatch.setattr(
        storage, "fsspec_filesystem", lambda *a, **k: DiesBeforeMarker(real_filesystem(*a, **k))
    )
    with pytest.raises(OSError, match="injected"):
        write_store(path, patches, fold=_fold(5), attrs=ATTRS, endpoint=s3_endpoint, overwrite=True, **fields)
    monkeypatch.undo()
    objects = _objects(s3_endpoint, "stores/marker")
    assert COMPLETION_MARKER not in objects and "patches/zarr.json" in objects
    with pytest.raises(
        StoreError, match=rf"{path} is incomplete \(no completion marker\).*rerun with --overwrite"
    ):
        NoduleStore.open(path, endpoint=s3_endpoint)
    assert not any(".tmp-" in o for o in _objects(s3_endpoint, "stores"))

    assert (
        write_store(
            path, patches, fold=_fold(5), attrs=ATTRS, endpoint=s3_endpoint, overwrite=True, **fields
        ).num_nodules
        == 5
    )
    assert NoduleStore.open(path, endpoint=s3_endpoint).array("patches").shape == (5, P, P, P)


def test_unreachable_endpoint_is_named():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(storage.StorageError, match=rf"S3 endpoint http://127.0.0.1:{port} is not reachable"):
        NoduleStore.open(f"s3://{BUCKET}/x", endpoint=f"http://127.0.0.1:{port}")
