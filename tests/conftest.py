"""Fixtures shared by the whole suite.

* ``synthetic_store``: one small synthetic nodule store (``tests/synthetic.py``) for every test
  that only reads it (session-scoped; a test that damages a store builds its own).
* ``ray_session``: one embedded Ray (4 logical CPUs) for every test that can share a cluster;
  started on first use, stopped at the end of the session by :func:`cliplung.cluster.shutdown_ray`.
  Tests that need a cluster of their own (a two-node cluster, a fake autoscaler, a second
  unrelated instance) start and stop it themselves, by pid.

Test credentials: object-store keys are fixed for the whole session and set in the environment
before any Ray node starts (Ray workers inherit the environment of the node that spawns them),
so run storage on the test S3 server works from every worker. They are distinctive strings, so a
test can prove they never reach a file or object the code writes.
"""

from __future__ import annotations

import os

import pytest
from pgserver import pg_server  # noqa: F401  (the suite's PostgreSQL, tests/pgserver.py)
from rayenv import RAY_TRAIN_TEST_ENV
from s3server import s3_server  # noqa: F401  (the session's SeaweedFS S3 server fixture)

TEST_AWS_ACCESS_KEY_ID = "CLIPLUNGTESTKEY7F3A"
TEST_AWS_SECRET_ACCESS_KEY = "cliplung-test-secret-9b2c-do-not-persist"
TEST_AWS_REGION = "us-east-1"


def pytest_configure(config):
    os.environ["AWS_ACCESS_KEY_ID"] = TEST_AWS_ACCESS_KEY_ID
    os.environ["AWS_SECRET_ACCESS_KEY"] = TEST_AWS_SECRET_ACCESS_KEY
    os.environ["AWS_DEFAULT_REGION"] = TEST_AWS_REGION
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.pop("RAY_ADDRESS", None)  # never join a cluster from the developer's shell
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    for name, value in RAY_TRAIN_TEST_ENV.items():  # Ray Train's poll interval, no preemption watcher
        os.environ.setdefault(name, value)  # (tests/rayenv.py says why)


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory):
    """A read-only synthetic store: 40 patients x 2 nodules, 16^3 patches, 5 folds."""
    from synthetic import make_synthetic_store

    return make_synthetic_store(str(tmp_path_factory.mktemp("synthetic") / "syn"))


@pytest.fixture
def forbid_ray(monkeypatch):
    """Bad input must fail before Ray is started or joined: every way into ``ensure_ray`` raises."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for input that should have been refused first")

    for module in (
        "cliplung.cluster",
        "cliplung.train.trainer",
        "cliplung.tune.search",
        "cliplung.evaluate.cv",
    ):
        monkeypatch.setattr(f"{module}.ensure_ray", refuse, raising=False)


@pytest.fixture(scope="session")
def ray_session():
    """The suite's embedded Ray (4 logical CPUs on loopback); yields its GCS address."""
    import ray

    from cliplung.cluster import ensure_ray, shutdown_ray

    ensure_ray(num_cpus=4)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        shutdown_ray()
