"""The training-metrics exporter without Ray: what it serves, where it listens, how long series live.

The Ray actor is a thin wrapper around :class:`cliplung.train.prometheus.Exporter`; these tests run
the wrapped class with a fake clock and read its real HTTP endpoint. Ray-level behaviour (one
exporter per host and port, two nodes on one machine) is tested in test_metrics_prometheus.py and
test_cluster_configs.py.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cliplung.config import ConfigError, MetricsConfig, load_config
from cliplung.train import prometheus
from cliplung.train.prometheus import STALE_SECONDS, Exporter, listen_host


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def exporter(clock: Clock) -> Iterator[Exporter]:
    exp = Exporter("127.0.0.1", 0, clock=clock)
    try:
        yield exp
    finally:
        exp.server.shutdown()
        exp.server.server_close()


def scrape(exp: Exporter) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{exp.address()}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def runs(samples: dict) -> set[tuple[str, str]]:
    found = set()
    for _, labels in samples:
        d = dict(labels)
        if "run" in d:
            found.add((d["run"], d["rank"]))
    return found


EPOCH = {
    "epoch": 1,
    "loss": {"loss": 0.7, "ce": 0.5},
    "val": {"accuracy": 0.5, "macro_f1": 0.4},
    "samples_per_second": 12.0,
    "host_memory_bytes": 1e9,
    "gpu_memory_bytes": 0,
}


def test_one_report_makes_every_dashboard_series(exporter: Exporter) -> None:
    exporter.record("a", 0, {"step_seconds": [0.1, 0.2], "data_wait_seconds": [0.01, 0.0]})
    exporter.record("a", 0, EPOCH)
    exporter.record("a", 0, {"upload_seconds": 0.3, "upload_failed": False})
    samples = scrape(exporter)
    labels = (("rank", "0"), ("run", "a"))
    assert samples[("cliplung_epoch", labels)] == 1
    assert samples[("cliplung_gpu_memory_bytes", labels)] == 0, "a CPU worker reports 0, not nothing"
    assert samples[("cliplung_checkpoint_upload_failures_total", labels)] == 0, "counter starts at 0"
    assert samples[("cliplung_step_seconds_count", labels)] == 2
    assert samples[("cliplung_loss", (("part", "ce"), *labels))] == 0.5
    assert samples[("cliplung_val_metric", (("metric", "macro_f1"), *labels))] == 0.4
    exporter.record("a", 0, {"upload_seconds": 1.0, "upload_failed": True})
    assert scrape(exporter)[("cliplung_checkpoint_upload_failures_total", labels)] == 1


def test_a_finished_run_goes_after_its_linger(exporter: Exporter, clock: Clock) -> None:
    for rank in (0, 1):
        exporter.record("done", rank, EPOCH)
    exporter.record("other", 0, EPOCH)
    exporter.finish("done", 0, linger_seconds=30)
    exporter.finish("done", 1, linger_seconds=30)
    clock.now += 29
    assert exporter.reap() == []
    assert runs(scrape(exporter)) == {("done", "0"), ("done", "1"), ("other", "0")}, "final values stay"
    clock.now += 2
    assert sorted(exporter.reap()) == [("done", "0"), ("done", "1")]
    samples = scrape(exporter)
    assert runs(samples) == {("other", "0")}
    assert not [k for k in samples if dict(k[1]).get("run") == "done"], "every label set of the run is gone"


def test_a_worker_that_reports_again_after_finish_stays(exporter: Exporter, clock: Clock) -> None:
    # A resumed run (or a retried worker) reuses its run and rank.
    exporter.record("resumed", 0, EPOCH)
    exporter.finish("resumed", 0, linger_seconds=5)
    clock.now += 1
    exporter.record("resumed", 0, {"samples_per_second": 3.0})
    clock.now += 10
    assert exporter.reap() == []
    assert runs(scrape(exporter)) == {("resumed", "0")}


def test_a_silent_worker_expires(exporter: Exporter, clock: Clock) -> None:
    exporter.record("killed", 0, EPOCH)  # then the process dies without a word
    exporter.record("alive", 0, EPOCH)
    clock.now += STALE_SECONDS - 5
    exporter.record("alive", 0, {"samples_per_second": 1.0})
    clock.now += 5
    assert exporter.reap() == [("killed", "0")]
    assert runs(scrape(exporter)) == {("alive", "0")}
    exporter.record("killed", 0, EPOCH)
    assert ("killed", "0") in runs(scrape(exporter)), "a label set can come back after removal"


def test_the_exporter_listens_where_it_is_told(exporter: Exporter) -> None:
    host, port = exporter.server.server_address[:2]
    assert host == "127.0.0.1" and port == exporter.port > 0


def test_listen_host_defaults_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(prometheus.HOST_ENV, raising=False)
    assert listen_host(MetricsConfig()) == "127.0.0.1"
    monkeypatch.setenv(prometheus.HOST_ENV, "0.0.0.0")
    assert listen_host(MetricsConfig()) == "0.0.0.0", "the node's environment (the k8s manifests)"
    assert listen_host(MetricsConfig(host="127.0.0.1")) == "127.0.0.1", "the config wins"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("metrics.host=example.org", "metrics.host: must be an IP address"),
        ("metrics.port=65536", "metrics.port: must be in \\[0, 65535\\]"),
        ("metrics.port=-1", "metrics.port: must be in \\[0, 65535\\]"),
        ("metrics.linger_seconds=.inf", "metrics.linger_seconds: must be a finite number"),
        ("metrics.linger_seconds=-1", "metrics.linger_seconds: must be >= 0"),
    ],
)
def test_metrics_settings_are_checked(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("debug", [override])
    assert load_config("debug", ["metrics.host=0.0.0.0"]).metrics.host == "0.0.0.0"
