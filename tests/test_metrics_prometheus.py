"""A real Prometheus scrapes a real training run, and every Grafana panel query returns data.

Prometheus (Debian's package, started and stopped by the test) scrapes two targets of the suite's
embedded Ray every second: the cliplung exporter and Ray's own metrics port, labelled
``ray_io_cluster`` as the PodMonitor's relabelling does. After a short training run, every panel
query of ``k8s/base/grafana/cliplung-dashboard.json`` (Grafana's variables substituted) is sent to
Prometheus' HTTP API at a moment inside the run. Then the series' lifetime: the finished run's
label sets leave the endpoint after ``metrics.linger_seconds`` and Prometheus marks them stale, and
a later run that asks for another ``metrics.port`` gets an exporter there.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_k8s_manifests import dashboard_queries

from cliplung.config import load_config

PROMETHEUS = shutil.which("prometheus")
RUN = "prom"
LINGER_SECONDS = 15
# Enough epochs that the run's step and checkpoint counters grow across several 1 s scrapes: with
# 3 epochs of the small store all of them could land between two scrapes, and rate() over
# samples that never changed is 0 (a NaN quantile), which says nothing about the queries.
EPOCHS = 8
GPU_PANELS = ("ray_node_gpus_utilization", "ray_node_gram_used")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(base: str, promql: str, at: float | None = None) -> list[dict]:
    params = {"query": promql} | ({"time": f"{at:.3f}"} if at is not None else {})
    with urllib.request.urlopen(
        f"{base}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10
    ) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _wait(what: str, check, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _runs_on(address: str) -> set[str]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        s.labels["run"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "run" in s.labels
    }


@pytest.fixture
def prometheus_server(tmp_path: Path):
    """Start Prometheus with a config written later by the test; yields (config path, base URL, start)."""
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    server: list[subprocess.Popen] = []

    def start(targets: dict[str, str]) -> None:
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            "        labels: {ray_io_cluster: test}\n"
            for job, target in targets.items()
        )
        config.write_text(
            f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{jobs}"
        )
        server.append(
            subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    try:
        yield f"http://127.0.0.1:{port}", start
    finally:
        for process in server:
            process.terminate()
            process.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(
    PROMETHEUS is None, reason="Debian's prometheus package is not installed (make system-deps)"
)
def test_every_dashboard_query_returns_data_for_a_real_run(
    ray_session, synthetic_store, prometheus_server, tmp_path: Path
) -> None:
    import ray

    from cliplung.train.trainer import train

    base, start_prometheus = prometheus_server
    metrics_port = _free_port()
    config = load_config(
        "debug",
        [f"data.store={synthetic_store.path}", f"storage.path={tmp_path / 'runs'}", f"name={RUN}",
         f"train.epochs={EPOCHS}", f"metrics.port={metrics_port}", f"metrics.linger_seconds={LINGER_SECONDS}",
         "train.max_failures=0"],
    )  # fmt: skip
    (node,) = [n for n in ray.nodes() if n["Alive"]]
    ray_metrics = f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
    start_prometheus({"cliplung": f"127.0.0.1:{metrics_port}", "ray": ray_metrics})

    started = time.time()
    summary = train(config)
    finished = time.time()
    assert summary.metrics["epoch"] == EPOCHS - 1

    # The panels are evaluated while the run's series are still exported: the workers reported
    # their last epoch just before train() returned, and their series stay for LINGER_SECONDS
    # after that. At the moment train() returns the newest series can still have a single sample
    # (Ray Train's controller, polled every 0.25 s in the suite, returns as soon as the workers
    # are done; rate() needs two), so the panels are asked at each second from 1 s after the end
    # until every one has data or the linger is nearly over; the last moment asked is reported.
    no_gpu = not ray.cluster_resources().get("GPU")

    def evaluate(at: float) -> tuple[list[str], list[str]]:
        window = f"{math.ceil(at - started) + 5}s"
        variables = {"run": RUN, "cluster": "test", "__rate_interval": window, "__range": window}
        empty, not_finite = [], []
        for title, expr in dashboard_queries(variables):
            if no_gpu and any(m in expr for m in GPU_PANELS):
                # Ray exports GPU series only for GPUs it detected; this machine has none.
                assert _query(base, expr, at) == [], expr
                continue
            result = _query(base, expr, at)
            if not result:
                empty.append(f"{title}: {expr}")
            elif "cliplung_" in expr and not any(math.isfinite(float(r["value"][1])) for r in result):
                not_finite.append(f"{title}: {expr} -> {result}")
        return empty, not_finite

    at = finished + 1
    while True:
        _wait("a scrape after that moment", lambda: time.time() > at + 1)  # noqa: B023
        empty, not_finite = evaluate(at)
        if not (empty or not_finite) or at >= finished + LINGER_SECONDS - 5:
            break
        at += 1
    assert not empty, f"panels with no data {at - finished:.0f} s after the run:\n" + "\n".join(empty)
    assert not not_finite, "panels with no finite value:\n" + "\n".join(not_finite)
    ranks = _query(base, f'cliplung_samples_per_second{{run="{RUN}"}}', at)
    assert {r["metric"]["rank"] for r in ranks} == {"0", "1"}
    assert {float(r["value"][1]) for r in _query(base, f'cliplung_epoch{{run="{RUN}"}}', at)} == {
        EPOCHS - 1.0
    }

    # Lifetime: the finished run leaves the endpoint after its linger, and Prometheus marks it stale.
    exporter = f"127.0.0.1:{metrics_port}"
    _wait(
        "the finished run's series to leave the endpoint", lambda: RUN not in _runs_on(exporter), timeout=60
    )
    _wait(
        "Prometheus to mark the run stale", lambda: _query(base, f'cliplung_epoch{{run="{RUN}"}}') == [], 30
    )

    # A later run's metrics.port is honoured (an exporter there, not the earlier run's).
    later_port = _free_port()

    @ray.remote(num_cpus=0)
    def later_run() -> bool:
        from cliplung.config import MetricsConfig
        from cliplung.train.prometheus import WorkerMetrics

        metrics = WorkerMetrics("later", 0, MetricsConfig(port=later_port))
        metrics.epoch(0, {"loss": 1.0}, {"accuracy": 0.5}, samples_per_second=1.0)
        return metrics.actor is not None and bool(ray.get(metrics.actor.workers.remote()))

    assert ray.get(later_run.remote(), timeout=60)
    assert "later" in _runs_on(f"127.0.0.1:{later_port}")
    assert "later" not in _runs_on(exporter)
