"""Training metrics for Prometheus: one prometheus-client endpoint per host, fed by every worker.

Why one exporter actor per host rather than an HTTP server in each worker: several training
workers (and several Tune trials) share a node, and each would need its own port, which a
``PodMonitor`` cannot discover. Instead the first worker on a host starts a small Ray actor pinned
to its node (named ``cliplung-metrics-<node ip>-<host>-<port>``, detached, zero CPUs) that serves a
prometheus-client registry on one fixed port (``metrics.port``, 9464 by default); workers send it
their numbers with fire-and-forget actor calls. Every series is labelled with ``run`` and ``rank``.
Ray's own metrics stay on Ray's metrics port; both are scraped by the PodMonitor in ``k8s/``.

The actor is named after the node's IP address, not the node: two Ray nodes on one machine (the
local two-node cluster) share one IP and could not both bind the port, so their workers share one
exporter; on Kubernetes every pod has its own IP and gets its own. The listening address and the
port are part of the name, so a later run that asks for another port or address gets an exporter
there instead of the one an earlier run started.

Series have a lifetime: a run's label sets are removed ``metrics.linger_seconds`` after its worker
says it finished (long enough for a few scrapes of the final values), and those of a worker that
stopped reporting without a word (killed, crashed, an early-stopped Tune trial) after
:data:`STALE_SECONDS`. A finished run therefore leaves nothing behind for Grafana to draw as a
flat line, and a resumed run's workers bring their series back.

Exported (prefix ``cliplung_``): ``samples_per_second``, ``step_seconds`` (histogram),
``data_wait_seconds`` (histogram), ``loss{part}``, ``epoch``, ``val_metric{metric}``,
``host_memory_bytes``, ``gpu_memory_bytes`` (0 on CPU workers), ``checkpoint_upload_seconds``
(histogram), ``checkpoint_upload_failures_total`` (present from a run's first report, at 0).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from cliplung.config import MetricsConfig

log = logging.getLogger(__name__)

NAMESPACE = "cliplung"
LOOPBACK = "127.0.0.1"
HOST_ENV = "CLIPLUNG_METRICS_HOST"
"""Node environment variable that sets the listening address when ``metrics.host`` is unset."""
STALE_SECONDS = 600.0
"""A live worker reports at every step flush (about once a second) and every epoch end; one silent
this long is gone, and its series are dropped."""
REAP_INTERVAL_SECONDS = 1.0


@dataclass
class _LabelSets:
    """The label sets one worker (run, rank) created, and when it last spoke or finished."""

    children: set[tuple[object, tuple[str, ...]]] = field(default_factory=set)
    last_seen: float = 0.0
    remove_at: float | None = None


class Exporter:
    """The registry, its HTTP endpoint and the series bookkeeping (plain Python; the Ray actor
    :class:`MetricsExporter` wraps it)."""

    def __init__(self, host: str, port: int, clock: Callable[[], float] = time.monotonic) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self._clock = clock
        self._lock = threading.Lock()
        self._workers: dict[tuple[str, str], _LabelSets] = {}
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
        self.host = host
        self.server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self.server.server_port

    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _child(self, book: _LabelSets, metric, *labels: str):
        book.children.add((metric, labels))
        return metric.labels(*labels)

    def record(self, run: str, rank: int, values: dict) -> None:
        lbl = (run, str(rank))
        with self._lock:
            book = self._workers.setdefault(lbl, _LabelSets())
            book.last_seen, book.remove_at = self._clock(), None

            def child(metric, *extra: str):
                return self._child(book, metric, *lbl, *extra)

            # A counter that exists from the start reads 0 rather than "no data".
            child(self.upload_failures)
            for seconds in values.get("step_seconds", ()):
                child(self.step_seconds).observe(seconds)
            for seconds in values.get("data_wait_seconds", ()):
                child(self.data_wait_seconds).observe(seconds)
            if "samples_per_second" in values:
                child(self.samples_per_second).set(values["samples_per_second"])
            for part, value in values.get("loss", {}).items():
                child(self.loss, part).set(value)
            if "epoch" in values:
                child(self.epoch).set(values["epoch"])
            for name, value in values.get("val", {}).items():
                child(self.val_metric, name).set(value)
            if "host_memory_bytes" in values:
                child(self.host_memory).set(values["host_memory_bytes"])
            if "gpu_memory_bytes" in values:
                child(self.gpu_memory).set(values["gpu_memory_bytes"])
            if "upload_seconds" in values:
                child(self.upload_seconds).observe(values["upload_seconds"])
            if values.get("upload_failed"):
                child(self.upload_failures).inc()

    def finish(self, run: str, rank: int, linger_seconds: float) -> None:
        """The worker is done: keep its final values for ``linger_seconds``, then drop them."""
        with self._lock:
            book = self._workers.get((run, str(rank)))
            if book is not None:
                book.remove_at = self._clock() + linger_seconds

    def reap(self) -> list[tuple[str, str]]:
        """Drop the label sets of finished workers past their linger and of silent ones."""
        now = self._clock()
        with self._lock:
            doomed = [
                key
                for key, book in self._workers.items()
                if (book.remove_at is not None and now >= book.remove_at)
                or now - book.last_seen >= STALE_SECONDS
            ]
            for key in doomed:
                for metric, labels in self._workers.pop(key).children:
                    metric.remove(*labels)
        return doomed

    def workers(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._workers)


@ray.remote(num_cpus=0)
class MetricsExporter:
    """Serves the cliplung metrics of every worker on this host at ``http://<host>:<port>/metrics``."""

    def __init__(self, host: str, port: int) -> None:
        self._exporter = Exporter(host, port)
        threading.Thread(target=self._reap_forever, name="cliplung-metrics-reaper", daemon=True).start()

    def _reap_forever(self) -> None:
        while True:
            time.sleep(REAP_INTERVAL_SECONDS)
            self._exporter.reap()

    def address(self) -> str:
        return self._exporter.address()

    def record(self, run: str, rank: int, values: dict) -> None:
        self._exporter.record(run, rank, values)

    def finish(self, run: str, rank: int, linger_seconds: float) -> None:
        self._exporter.finish(run, rank, linger_seconds)

    def workers(self) -> list[tuple[str, str]]:
        return self._exporter.workers()


def listen_host(config: MetricsConfig) -> str:
    """The address this node's exporter listens on (``metrics.host``, the node's environment,
    loopback)."""
    return config.host or os.environ.get(HOST_ENV) or LOOPBACK


def host_exporter(host: str, port: int):
    """The exporter actor of this host for ``host:port``, started if absent (None if it cannot
    start)."""
    node_id = ray.get_runtime_context().get_node_id()
    name = f"cliplung-metrics-{ray.util.get_node_ip_address()}-{host}-{port}"
    try:
        actor = MetricsExporter.options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id, soft=False
            ),
        ).remote(host, port)
        ray.get(actor.address.remote(), timeout=30)
        return actor
    except Exception as exc:  # metrics must never stop training
        log.warning("cliplung metrics disabled on this node: exporter on %s:%s failed: %s", host, port, exc)
        return None


class WorkerMetrics:
    """What a training worker reports; batches step timings and flushes about once a second."""

    def __init__(self, run: str, rank: int, config: MetricsConfig) -> None:
        self.run, self.rank = run, rank
        self.linger_seconds = config.linger_seconds
        self.actor = host_exporter(listen_host(config), config.port) if config.enabled else None
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
        self._send(
            epoch=epoch,
            loss=loss,
            val=val,
            samples_per_second=samples_per_second,
            host_memory_bytes=_rss_bytes(),
            gpu_memory_bytes=gpu_memory_bytes,
        )

    def checkpoint(self, seconds: float, failed: bool = False) -> None:
        self._send(upload_seconds=seconds, upload_failed=failed)

    def finish(self) -> None:
        """The run is over for this worker: its series go after ``metrics.linger_seconds``."""
        if self.actor is None:
            return
        if self._steps:
            self._send(step_seconds=self._steps, data_wait_seconds=self._waits)
            self._steps, self._waits = [], []
        self.actor.finish.remote(self.run, self.rank, self.linger_seconds)

    def _send(self, **values) -> None:
        if self.actor is not None:
            self.actor.record.remote(self.run, self.rank, values)


def _rss_bytes() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss
