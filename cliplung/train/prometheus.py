"""Training metrics for Prometheus: one prometheus-client endpoint per node, fed by every worker.

Why one exporter actor per node rather than an HTTP server in each worker: several training
workers (and several Tune trials) share a node, and each would need its own port, which a
``PodMonitor`` cannot discover. Instead the first worker on a node starts a small Ray actor pinned
to that node (named ``cliplung-metrics-<node id>``, detached, zero CPUs) that serves a
prometheus-client registry on one fixed port (``metrics.port``, 9464 by default); workers send it
their numbers with fire-and-forget actor calls. Every series is labelled with ``run`` and ``rank``.
Ray's own metrics stay on Ray's metrics port; both are scraped by the PodMonitor in ``k8s/``.

Exported (prefix ``cliplung_``): ``samples_per_second``, ``step_seconds`` (histogram),
``data_wait_seconds`` (histogram), ``loss{part}``, ``epoch``, ``val_metric{metric}``,
``host_memory_bytes``, ``gpu_memory_bytes``, ``checkpoint_upload_seconds`` (histogram),
``checkpoint_upload_failures_total``.
"""

from __future__ import annotations

import logging
import os
import time

import ray

log = logging.getLogger(__name__)

NAMESPACE = "cliplung"


@ray.remote(num_cpus=0)
class MetricsExporter:
    """Serves the cliplung metrics of every worker on this node at ``http://<node>:port/metrics``."""

    def __init__(self, port: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.registry = CollectorRegistry()
        labels = ("run", "rank")
        r = self.registry
        self.samples_per_second = Gauge(
            "cliplung_samples_per_second", "Training samples/s", labels, registry=r
        )
        buckets = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.step_seconds = Histogram(
            "cliplung_step_seconds", "Training step time", labels, buckets=buckets, registry=r
        )
        self.data_wait_seconds = Histogram(
            "cliplung_data_wait_seconds",
            "Time a step waited for its batch",
            labels,
            buckets=buckets,
            registry=r,
        )
        self.loss = Gauge("cliplung_loss", "Training loss parts (epoch mean)", (*labels, "part"), registry=r)
        self.epoch = Gauge("cliplung_epoch", "Last finished epoch", labels, registry=r)
        self.val_metric = Gauge("cliplung_val_metric", "Validation metrics", (*labels, "metric"), registry=r)
        self.host_memory = Gauge("cliplung_host_memory_bytes", "Worker resident memory", labels, registry=r)
        self.gpu_memory = Gauge("cliplung_gpu_memory_bytes", "Peak GPU memory allocated", labels, registry=r)
        self.upload_seconds = Histogram(
            "cliplung_checkpoint_upload_seconds",
            "Checkpoint persist time",
            labels,
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.upload_failures = Counter(
            "cliplung_checkpoint_upload_failures", "Failed checkpoint uploads", labels, registry=r
        )
        self.server, _ = start_http_server(port, registry=self.registry)
        self.port = self.server.server_port

    def address(self) -> str:
        return f"{ray.util.get_node_ip_address()}:{self.port}"

    def record(self, run: str, rank: int, values: dict) -> None:
        lbl = (run, str(rank))
        for seconds in values.get("step_seconds", ()):
            self.step_seconds.labels(*lbl).observe(seconds)
        for seconds in values.get("data_wait_seconds", ()):
            self.data_wait_seconds.labels(*lbl).observe(seconds)
        if "samples_per_second" in values:
            self.samples_per_second.labels(*lbl).set(values["samples_per_second"])
        for part, value in values.get("loss", {}).items():
            self.loss.labels(*lbl, part).set(value)
        if "epoch" in values:
            self.epoch.labels(*lbl).set(values["epoch"])
        for name, value in values.get("val", {}).items():
            self.val_metric.labels(*lbl, name).set(value)
        if "host_memory_bytes" in values:
            self.host_memory.labels(*lbl).set(values["host_memory_bytes"])
        if "gpu_memory_bytes" in values:
            self.gpu_memory.labels(*lbl).set(values["gpu_memory_bytes"])
        if "upload_seconds" in values:
            self.upload_seconds.labels(*lbl).observe(values["upload_seconds"])
        if values.get("upload_failed"):
            self.upload_failures.labels(*lbl).inc()


def node_exporter(port: int):
    """The exporter actor of the current node, started if absent (None if it cannot start)."""
    node_id = ray.get_runtime_context().get_node_id()
    try:
        actor = MetricsExporter.options(
            name=f"cliplung-metrics-{node_id}",
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id, soft=False
            ),
        ).remote(port)
        ray.get(actor.address.remote(), timeout=30)
        return actor
    except Exception as exc:  # metrics must never stop training
        log.warning("cliplung metrics disabled on this node: exporter on port %s failed: %s", port, exc)
        return None


class WorkerMetrics:
    """What a training worker reports; batches step timings and flushes about once a second."""

    def __init__(self, run: str, rank: int, port: int, enabled: bool = True) -> None:
        self.run, self.rank = run, rank
        self.actor = node_exporter(port) if enabled else None
        self._steps: list[float] = []
        self._waits: list[float] = []
        self._samples = 0
        self._since = time.perf_counter()

    def step(self, step_seconds: float, data_wait_seconds: float, samples: int) -> None:
        if self.actor is None:
            return
        self._steps.append(step_seconds)
        self._waits.append(data_wait_seconds)
        self._samples += samples
        now = time.perf_counter()
        if now - self._since >= 1.0:
            self._send(
                step_seconds=self._steps,
                data_wait_seconds=self._waits,
                samples_per_second=self._samples / (now - self._since),
                host_memory_bytes=_rss_bytes(),
            )
            self._steps, self._waits, self._samples, self._since = [], [], 0, now

    def epoch(
        self,
        epoch: int,
        loss: dict[str, float],
        val: dict[str, float],
        samples_per_second: float,
        gpu_memory_bytes: int = 0,
    ) -> None:
        values = {
            "epoch": epoch,
            "loss": loss,
            "val": val,
            "samples_per_second": samples_per_second,
            "host_memory_bytes": _rss_bytes(),
        }
        if gpu_memory_bytes:
            values["gpu_memory_bytes"] = gpu_memory_bytes
        self._send(**values)

    def checkpoint(self, seconds: float, failed: bool = False) -> None:
        self._send(upload_seconds=seconds, upload_failed=failed)

    def _send(self, **values) -> None:
        if self.actor is not None:
            self.actor.record.remote(self.run, self.rank, values)


def _rss_bytes() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss
