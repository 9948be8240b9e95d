"""A real Prometheus server scrapes a training run's metrics endpoint."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from synthetic import make_synthetic_store

from cliplung.config import load_config

PROMETHEUS = shutil.which("prometheus")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.slow
@pytest.mark.skipif(
    PROMETHEUS is None, reason="Debian's prometheus package is not installed (make system-deps)"
)
def test_prometheus_scrapes_training_metrics(tmp_path):
    import ray

    from cliplung.cluster import ensure_ray
    from cliplung.train.trainer import train

    store = make_synthetic_store(str(tmp_path / "store"))
    metrics_port = _free_port()
    config = load_config(
        "debug",
        [f"data.store={store.path}", f"storage.path={tmp_path / 'runs'}", "name=prom", "train.epochs=3",
         f"metrics.port={metrics_port}", "train.max_failures=0"],
    )  # fmt: skip
    prom_port = _free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: cliplung\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    server = subprocess.Popen(
        [
            PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{prom_port}"
    try:
        ensure_ray(num_cpus=4)
        summary = train(config)
        assert summary.metrics["epoch"] == 2
        # The node's exporter actor outlives the run while Ray is up; wait for scrapes to land.
        deadline = time.monotonic() + 60
        result = []
        while time.monotonic() < deadline:
            try:
                result = _query(base, 'cliplung_samples_per_second{run="prom"}')
            except OSError:
                result = []
            if result and any(float(r["value"][1]) > 0 for r in result):
                break
            time.sleep(1)
        assert result, "Prometheus has no cliplung_samples_per_second series for the run"
        assert {r["metric"]["rank"] for r in result} == {"0", "1"}
        assert all(float(r["value"][1]) > 0 for r in result)
        epochs = _query(base, 'cliplung_epoch{run="prom"}')
        assert {float(r["value"][1]) for r in epochs} == {2.0}
        assert _query(base, 'cliplung_checkpoint_upload_seconds_count{run="prom"}')
        assert _query(base, 'cliplung_loss{run="prom",part="ce"}')
    finally:
        server.terminate()
        server.wait(timeout=30)
        ray.shutdown()
