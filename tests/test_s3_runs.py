"""Runs against a real S3 server (SeaweedFS, tests/s3server.py) on the suite's embedded Ray: the
run's lease on S3 (conditional writes; taken while the server restarts), store reads that ride out
an outage, run storage that resumes, an outage in the middle of a checkpoint upload, wrong
credentials, and no credential in any object or file a run writes."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import TEST_AWS_ACCESS_KEY_ID, TEST_AWS_SECRET_ACCESS_KEY
from s3server import BUCKET
from synthetic import make_synthetic_store

from cliplung import cli
from cliplung.config import apply_overrides, load_config
from cliplung.data.store import NoduleStore
from cliplung.runs import LEASE_FILE, Run, RunError

pytestmark = pytest.mark.slow  # a server and Ray runs


def _config(store_path: str, storage: str, name: str, *extra: str):
    return load_config(
        "debug",
        [
            f"data.store={store_path}",
            f"storage.path={storage}",
            f"name={name}",
            "metrics.enabled=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> NoduleStore:
    return make_synthetic_store(str(tmp_path_factory.mktemp("store") / "syn"))


@pytest.fixture(scope="module")
def s3_store(s3_server) -> NoduleStore:
    return make_synthetic_store(
        f"s3://{BUCKET}/runs-store-{uuid.uuid4().hex[:8]}/syn", endpoint=s3_server.url
    )


def test_wrong_credentials_fail_before_any_worker_naming_the_endpoint(
    s3_server, local_store, monkeypatch, capsys
):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-for-this-test")
    argv = [
        "train", "--data", local_store.path, "--storage", f"s3://{BUCKET}/creds-runs",
        "--storage-endpoint", s3_server.url, "--name", "refused", "--set", "metrics.enabled=false",
    ]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"S3 endpoint {s3_server.url} refused the credentials (SignatureDoesNotMatch" in err, err
    assert "wrong-secret-for-this-test" not in err
    assert not s3_server.keys("creds-runs/")


def _lease_keys(s3_server, prefix: str) -> list[str]:
    return [k for k in s3_server.keys(f"{prefix}/") if k.endswith(LEASE_FILE)]


def test_the_s3_lease_refuses_a_second_driver_and_a_stale_one_is_taken_over(s3_server, capsys):
    prefix = f"lease-{uuid.uuid4().hex[:8]}"
    run = Run(f"s3://{BUCKET}/{prefix}", "r", s3_server.url)
    with run.lease(purpose="first") as first:
        assert _lease_keys(s3_server, prefix) == [f"{prefix}/r/{LEASE_FILE}"]
        with pytest.raises(RunError, match=r"being written by another driver \(host .*first since"):
            Run(f"s3://{BUCKET}/{prefix}", "r", s3_server.url).lease(purpose="second").acquire()
        first.renew()
        assert not first.lost.is_set()
    assert _lease_keys(s3_server, prefix) == []  # given back
    # A holder on another host that stopped heartbeating: taken over by a conditional write.
    stale = {"host": "gone-host", "pid": 1, "token": "t", "purpose": "old", "heartbeat": time.time() - 3600}
    s3_server.put(f"{prefix}/r/{LEASE_FILE}", json.dumps(stale).encode())
    with run.lease(purpose="new") as new:
        assert "taking over the lease" in capsys.readouterr().err
        assert json.loads(s3_server.read(f"{prefix}/r/{LEASE_FILE}"))["token"] == new.holder["token"]


def test_the_s3_lease_is_taken_while_the_server_restarts(s3_server, caplog):
    """A driver that starts while the object store restarts waits for it (the retry schedule of
    every other storage call) instead of failing: found when the S3 outage test below resumed its
    run right after the server came back and the lease read got ``InternalError``."""
    prefix = f"lease-{uuid.uuid4().hex[:8]}"
    run = Run(f"s3://{BUCKET}/{prefix}", "r", s3_server.url)
    s3_server.stop()
    # Down for 5 s and about 2 s of start: longer than botocore's and s3fs's own retries ride out
    # (a read failed after 3.4 s with the server down).
    restart = threading.Timer(5.0, s3_server.start)
    restart.start()
    try:
        with (
            caplog.at_level(logging.WARNING, logger="cliplung.storage"),
            run.lease(purpose="after-restart") as lease,
        ):
            assert lease.version is not None
            assert _lease_keys(s3_server, prefix) == [f"{prefix}/r/{LEASE_FILE}"]
    finally:
        restart.join()
        if s3_server.process is None:
            s3_server.start()
    retries = [r.getMessage() for r in caplog.records if "; retry 1/" in r.getMessage()]
    assert retries and retries[0].startswith(f"lease of s3://{BUCKET}/{prefix}/r: read: "), retries
    assert _lease_keys(s3_server, prefix) == []


def _ray_worker_logs() -> str:
    import ray._private.worker

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    text = []
    for path in logs.glob("worker-*.err"):
        try:
            text.append(path.read_text(errors="replace"))
        except OSError:
            continue
    return "\n".join(text)


@pytest.mark.timeout(900)
def test_store_reads_ride_out_an_s3_outage(ray_session, s3_server, s3_store, tmp_path, monkeypatch, capfd):
    """Streaming ingest: the server goes down once the driver has checked the store and planned the
    reads, i.e. before the workers' read tasks run, and comes back a few seconds after the first of
    them has retried: the run ends normally, with no worker-group restart (max_failures=0 would turn
    one into a failed run)."""
    import cliplung.train.trainer as trainer
    from cliplung.train.trainer import train

    before = _ray_worker_logs().count("retry 1/")
    checked = threading.Event()
    real_plan = trainer.build_data_plan

    def plan(*args, **kwargs):
        built = real_plan(*args, **kwargs)
        checked.set()  # the driver reads nothing more from the store
        return built

    monkeypatch.setattr(trainer, "build_data_plan", plan)
    timeline: dict[str, float] = {}

    def outage() -> None:
        checked.wait(timeout=600)
        s3_server.stop()
        timeline["down"] = time.monotonic()
        deadline = time.monotonic() + 180
        while _ray_worker_logs().count("retry 1/") <= before and time.monotonic() < deadline:
            time.sleep(0.5)
        timeline["retried"] = time.monotonic()
        time.sleep(4)  # a few seconds more of outage, more retries
        s3_server.start()
        timeline["up"] = time.monotonic()

    watcher = threading.Thread(target=outage, daemon=True)
    watcher.start()
    cfg = _config(
        s3_store.path, str(tmp_path / "runs"), "outage-reads",
        f"storage.endpoint={s3_server.url}", "train.epochs=2", "train.max_failures=0", "data.ingest=stream",
    )  # fmt: skip
    try:
        summary = train(cfg)
    finally:
        watcher.join(timeout=300)
        if s3_server.process is None:
            s3_server.start()
    out = capfd.readouterr()
    log = out.out + out.err + _ray_worker_logs()
    with capfd.disabled():
        retries = [line for line in log.splitlines() if "; retry " in line]
        print(
            f"\noutage: down {timeline['up'] - timeline['down']:.1f} s, first retry after "
            f"{timeline['retried'] - timeline['down']:.1f} s; {len(retries)} retries, e.g.\n"
            + "\n".join(retries[:3])
        )
    assert summary.metrics["epoch"] == 1
    assert f"store {s3_store.path} (version {s3_store.version}): object " in log
    assert "EndpointConnectionError" in log and "retry 1/7" in log
    assert "gave up" not in log and "resuming from" not in out.out


@pytest.mark.timeout(900)
def test_s3_outage_during_checkpoint_upload_keeps_last_complete_checkpoint(
    ray_session, s3_server, local_store, capfd
):
    """Run storage on S3: the server dies in the middle of a checkpoint's upload, the run fails;
    the same command with one more epoch (``train.epochs`` may change on resume) continues from
    the last complete checkpoint on S3 and trains only the epochs left. (This test is also the
    suite's plain "S3 run storage resumes where it stopped": one run less than a test of each.)"""
    from cliplung.train.trainer import train

    prefix = f"runs-{uuid.uuid4().hex[:8]}"
    cfg = _config(
        local_store.path, f"s3://{BUCKET}/{prefix}", "outage",
        f"storage.endpoint={s3_server.url}", "train.epochs=4", "train.max_failures=0",
    )  # fmt: skip
    stopped = threading.Event()

    def stop_when_upload_starts() -> None:
        # Ray registers a checkpoint (and writes its snapshot) only after the controller has
        # collected the report; wait for that, then kill the server as soon as the next
        # checkpoint's first object lands, i.e. in the middle of its upload.
        deadline = time.monotonic() + 600
        registered: set[str] | None = None
        while time.monotonic() < deadline:
            keys = s3_server.keys(f"{prefix}/outage/")
            epochs = {k.split("/")[2] for k in keys if k.split("/")[2].startswith("epoch_")}
            if registered is None and any(k.endswith("checkpoint_manager_snapshot.json") for k in keys):
                registered = epochs
            elif registered is not None and epochs - registered:
                s3_server.stop(kill=True)
                stopped.set()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=stop_when_upload_starts, daemon=True)
    watcher.start()
    try:
        with pytest.raises(Exception):  # noqa: B017 - Ray wraps the worker's S3 error in its own types
            train(cfg)
    finally:
        watcher.join(timeout=30)
        if s3_server.process is None:
            s3_server.start()  # same ports, same data directory
    assert stopped.is_set()
    capfd.readouterr()
    resumed = train(apply_overrides(cfg, ["train.epochs=5"]))
    out = capfd.readouterr().out
    # It resumed from a checkpoint that was complete (epoch_0000, or epoch_0001 if its upload had
    # finished before the outage), never from scratch and never from a partial one, and trained
    # to the new end.
    assert "resuming from" in out and "epoch 1/5" not in out and "epoch 5/5" in out
    assert resumed.metrics["epoch"] == 4
    assert resumed.checkpoint.startswith(f"s3://{BUCKET}/{prefix}/outage/epoch_0004")
    keys = s3_server.keys(f"{prefix}/outage/")
    for expected in ("run.json", "config.yaml", "splits.json", "checkpoint_manager_snapshot.json"):
        assert f"{prefix}/outage/{expected}" in keys, f"{expected} missing from {keys[:20]}"
    for expected in ("model.pt", "ema.pt", "train_state.json", "deepspeed/"):
        assert any(k.startswith(f"{prefix}/outage/epoch_0004/{expected}") for k in keys), expected


def _files_below(root: Path, since: float) -> list[Path]:
    out = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            try:
                if path.is_file() and not path.is_symlink() and path.stat().st_mtime >= since:
                    out.append(path)
            except OSError:
                continue
    return out


RAY_TUNE_ENV_LOG = "runtime_env_agent.log"
"""Ray's log where Ray Tune's trial actors' runtime_env appears in clear. Ray Tune copies AWS_*
from the driver's environment into that runtime_env (``ENV_VARS_TO_PROPAGATE`` in
ray/tune/execution/class_cache.py, Ray 2.60) and the runtime env agent logs it; ``cliplung tune``
moves the keys off its environment first (``storage.aws_keys_off_the_environment``)."""


@pytest.fixture(scope="module")
def secret_runs(ray_session, s3_server, s3_store, tmp_path_factory):
    """train, tune and evaluate with S3 run storage and the suite's distinctive keys in the
    environment; every object in the bucket and every local file written meanwhile."""
    import ray._private.worker

    tmp_path = tmp_path_factory.mktemp("secrets")
    started = time.time() - 1
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        runs = f"s3://{BUCKET}/secrets-{uuid.uuid4().hex[:8]}"
        common = ["--storage", runs, "--storage-endpoint", s3_server.url, "--set", "metrics.enabled=false"]
        train = ["train", "--data", s3_store.path, "--name", "t", "--epochs", "1", "--workers", "1", *common]
        assert cli.main(train) == 0
        tune = [
            "tune", "--data", s3_store.path, "--name", "search", "--trials", "1", "--max-concurrent", "1",
            "--epochs", "1", "--resources-per-trial", "workers=1", "--study-db", f"sqlite:///{tmp_path / 'study.db'}",
            "--set", "tune.asha=false", *common,
        ]  # fmt: skip
        assert cli.main(tune) == 0
        evaluate = [
            "evaluate", "--run", "t", "--data", s3_store.path, "--out", str(tmp_path / "report"),
            "--storage", runs, "--storage-endpoint", s3_server.url,
        ]  # fmt: skip
        assert cli.main(evaluate) == 0
    finally:
        os.chdir(cwd)
    keys = s3_server.keys()
    prefix = runs[len(f"s3://{BUCKET}/") :]
    written = [k for k in keys if k.startswith(prefix + "/")]
    assert any(k.endswith("tuner.pkl") for k in written), "Tune pickled no state to S3?"
    assert any(k.endswith("model.pt") for k in written)
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    places = [tmp_path, session, Path.home() / "ray_results"]
    files = [f for place in places if place.exists() for f in _files_below(place, started)]
    assert any(f.suffix == ".db" for f in files) and any(f.name == "report.html" for f in files)
    return {"objects": {k: s3_server.read(k) for k in keys}, "files": files}


def _holding_a_key(blobs) -> list[str]:
    needles = (TEST_AWS_ACCESS_KEY_ID.encode(), TEST_AWS_SECRET_ACCESS_KEY.encode())
    return [name for name, blob in blobs if any(n in blob for n in needles)]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


@pytest.mark.timeout(1200)
def test_no_credential_reaches_any_object_or_file_the_runs_write(secret_runs):
    objects = secret_runs["objects"]
    assert _holding_a_key((f"s3://{BUCKET}/{k}", v) for k, v in objects.items()) == []
    files = [f for f in secret_runs["files"] if f.name != RAY_TUNE_ENV_LOG]
    assert _holding_a_key((str(f), _read(f)) for f in files) == []
    print(f"searched {len(objects)} objects and {len(files)} local files")


def test_no_credential_reaches_rays_runtime_env_log(secret_runs):
    logs = [f for f in secret_runs["files"] if f.name == RAY_TUNE_ENV_LOG]
    # The trial actors' runtime_env was logged (Tune's own PL_DISABLE_FORK sits next to where the
    # keys were), and no key is in it.
    assert any(b"PL_DISABLE_FORK" in _read(f) for f in logs), logs
    assert _holding_a_key((str(f), _read(f)) for f in logs) == []
