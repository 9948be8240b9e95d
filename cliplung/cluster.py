"""The Ray cluster a cliplung command runs on: join one, or start an embedded one.

:func:`ensure_ray` is the only place in the package that calls ``ray.init``. It joins ``address``
(or ``RAY_ADDRESS``) when one is given, and otherwise starts an embedded single-node Ray that

* serves its dashboard and job API on loopback only (``127.0.0.1:8265``); Ray's gRPC servers
  (GCS, raylet, workers) bind every interface whatever ``ray.init`` is told, and token
  authentication guards them;
* runs on a GCS port chosen here and **exported** as ``RAY_ADDRESS`` before the node starts, so
  every process of the cluster (drivers, Train controllers, their detached helpers such as Train
  V2's ``PlacementGroupCleaner``) finds *this* cluster through Ray's own address discovery, even
  when other Ray instances run on the host ("Found multiple active Ray instances" otherwise, and
  a stopped trial's placement group is never freed);
* keeps the dashboard on: Train V2 needs it to clean up a finished run's placement group.

**Placement** (:func:`check_placement`): before a run starts its workers, what it asks for
(``train.workers`` bundles of ``train.cpus_per_worker`` CPUs and ``train.gpus_per_worker`` GPUs,
each bundle on one node) is packed onto what the cluster has or could have. What it could have
comes from ``CLIPLUNG_NODE_TYPES``, a JSON object in the nodes' environment in the format of
Ray's autoscaler ``available_node_types`` (``{"gpu-workers": {"resources": {"CPU": 8, "GPU": 1},
"max_workers": 8}}``); ``{}`` declares a fixed cluster. The embedded cluster exports ``{}``;
the KubeRay manifests and ``cluster/local-cluster.sh`` set it for theirs. A run that can never be
placed fails at once (exit 2) saying what it asked, what exists and the flag to change; a run
that could be placed later (busy nodes, an autoscaler, or a cluster whose node types are not
declared) goes ahead, and :class:`PlacementWatch` says every so often what it waits for.

``address="local"`` is passed explicitly: a bare ``ray.init()`` joins whatever cluster Ray's
``ray_current_cluster`` file names, even a head that died long ago. :func:`shutdown_ray` stops
what :func:`ensure_ray` started and takes the exported address back out of the environment.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
from typing import Any

import ray
import ray.data

from cliplung.config import Config, ConfigError

__all__ = [
    "LOOPBACK",
    "NODE_TYPES_ENV",
    "PlacementError",
    "PlacementWatch",
    "check_placement",
    "ensure_ray",
    "is_embedded",
    "shutdown_ray",
]

NODE_TYPES_ENV = "CLIPLUNG_NODE_TYPES"

LOOPBACK = "127.0.0.1"

# The RAY_ADDRESS / RAY_GCS_SERVER_PORT values ensure_ray exported for its embedded cluster, and
# what they were before, so shutdown_ray can restore them.
_exported: dict[str, str | None] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _quiet_ray_data() -> None:
    # Per-operator progress bars from every worker drown the per-epoch lines; metrics go to
    # Prometheus and the dashboard instead.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.data.DataContext.get_current().enable_progress_bars = False


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), or start an embedded single-node Ray on loopback.

    A no-op when Ray is already initialised in this process (inside a Ray task or actor, or a
    second call from the same driver). ``num_cpus`` sizes an embedded cluster only.
    """
    if ray.is_initialized():
        return
    _quiet_ray_data()
    if _exported and os.environ.get("RAY_ADDRESS") == _exported.get("RAY_ADDRESS"):
        # Our own embedded cluster from an earlier ensure_ray in this process, since shut down.
        _restore_environment()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    port = _free_port()
    _export(NODE_TYPES_ENV, "{}")  # nothing will ever be added to an embedded cluster
    _export("RAY_GCS_SERVER_PORT", str(port))
    _export("RAY_ADDRESS", f"{LOOPBACK}:{port}")
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host=LOOPBACK,
            log_to_driver=True,
            configure_logging=False,
        )
    except BaseException:
        _restore_environment()
        raise


def is_embedded() -> bool:
    """True when this process started the Ray cluster it is connected to (:func:`ensure_ray`)."""
    return bool(_exported) and ray.is_initialized()


def shutdown_ray() -> None:
    """``ray.shutdown()``, and the environment as it was before :func:`ensure_ray` exported the
    embedded cluster's address."""
    ray.shutdown()
    _restore_environment()


def _export(name: str, value: str) -> None:
    _exported.setdefault(f"_before_{name}", os.environ.get(name))
    _exported[name] = value
    os.environ[name] = value


def _restore_environment() -> None:
    for name in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT", NODE_TYPES_ENV):
        if name not in _exported:
            continue
        before = _exported.get(f"_before_{name}")
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
    _exported.clear()


# --------------------------------------------------------------------------- placement


class PlacementError(ConfigError):
    """A run asks for more than the cluster has or could ever have."""


def _worker_bundle(config: Config) -> dict[str, float]:
    t = config.train
    bundle = {"CPU": float(t.cpus_per_worker)}
    if t.gpus_per_worker > 0:
        bundle["GPU"] = float(t.gpus_per_worker)
    return bundle


def _fits(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many ``bundle`` s fit on a node with ``node`` resources."""
    counts = [math.floor(node.get(r, 0.0) / v + 1e-9) for r, v in bundle.items() if v > 0]
    return min(counts) if counts else 0


def declared_node_types() -> dict[str, Any] | None:
    """``CLIPLUNG_NODE_TYPES`` parsed (None when unset: the cluster's growth is unknown)."""
    text = os.environ.get(NODE_TYPES_ENV)
    if text is None:
        return None
    try:
        types = json.loads(text)
        if not isinstance(types, dict):
            raise ValueError("not an object")
        for spec in types.values():
            float(spec.get("max_workers", 0))
            {str(k): float(v) for k, v in (spec.get("resources") or {}).items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"{NODE_TYPES_ENV}: expected a JSON object of node types with 'resources' and "
            f"'max_workers' (Ray's available_node_types format), got {text!r} ({exc})"
        ) from None
    return types


def _describe_nodes(nodes: list[dict[str, float]]) -> str:
    if not nodes:
        return "no nodes"
    parts = []
    for node in nodes:
        shown = ", ".join(f"{r} {node[r]:g}" for r in ("CPU", "GPU") if node.get(r))
        parts.append(f"[{shown or 'no CPU or GPU'}]")
    return f"{len(nodes)} node(s): " + " ".join(parts)


def check_placement(config: Config, *, extra_cpus: float = 0.0, drivers: float = 0.0) -> None:
    """Raise :class:`PlacementError` when ``config``'s run can never be placed on the current Ray
    cluster (call after :func:`ensure_ray`). ``extra_cpus``: CPUs the run needs beside its workers
    (anywhere on the cluster); ``drivers``: CPUs of a Tune trial's driver."""
    t = config.train
    bundle = _worker_bundle(config)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    nodes = [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in alive]
    types = declared_node_types()
    potential = list(nodes)
    growth = ""
    if types:
        # The head is the node the GCS runs on; the node types describe the workers it can add.
        gcs_host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
        head = [r for n, r in zip(alive, nodes, strict=True) if n.get("NodeManagerAddress") == gcs_host]
        potential = head + [
            {str(k): float(v) for k, v in (spec.get("resources") or {}).items()}
            for spec in types.values()
            for _ in range(int(spec.get("max_workers", 0)))
        ]
        growth = f"; with its autoscaler at most {_describe_nodes(potential)}"
    placed = sum(_fits(n, bundle) for n in potential)
    spare = sum(n.get("CPU", 0.0) for n in potential) - t.workers * bundle["CPU"]
    if placed >= t.workers and spare + 1e-9 >= extra_cpus + drivers:
        if types is None and sum(_fits(n, bundle) for n in nodes) < t.workers:
            print(
                f"note: the cluster's nodes cannot hold run {config.name} now and {NODE_TYPES_ENV} is "
                "not set, so cliplung cannot tell whether an autoscaler will add nodes; waiting",
                file=sys.stderr,
                flush=True,
            )
        return
    if types is None and nodes:
        # Unknown growth: never refuse what an autoscaler might still provide, but say so.
        print(
            f"warning: run {config.name} asks for more than the cluster has ({_describe_nodes(nodes)}); "
            f"it waits for an autoscaler to add nodes ({NODE_TYPES_ENV} not set)",
            file=sys.stderr,
            flush=True,
        )
        return
    asked = ", ".join(f"{v:g} {r}" for r, v in bundle.items())
    flags = "--workers (train.workers) or --set train.cpus_per_worker=N"
    if "GPU" in bundle:
        flags = "--workers (train.workers) or --gpus-per-worker (train.gpus_per_worker)"
    raise PlacementError(
        f"train.workers: run {config.name} needs {t.workers} worker(s) of {asked} each, one node per "
        f"worker bundle, plus {extra_cpus + drivers:g} CPU(s) for its data path and driver; the cluster "
        f"has {_describe_nodes(nodes)}{growth}, which can hold {placed} such worker(s). It would wait "
        f"forever: lower {flags}, or add nodes"
    )


class PlacementWatch:
    """While a run waits for its workers' placement group, say every ``interval_s`` seconds what it
    waits for (a context manager around ``trainer.fit()``)."""

    def __init__(self, config: Config, interval_s: float = 30.0) -> None:
        self.config = config
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="cliplung-placement", daemon=True)
        self._known: set[str] = set()

    def _pending(self) -> list[dict[str, Any]]:
        from ray.util import placement_group_table

        table = placement_group_table()
        return [
            pg for pg_id, pg in table.items() if pg.get("state") == "PENDING" and pg_id not in self._known
        ]

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                pending = self._pending()
            except Exception:  # the state API is best effort here
                continue
            if not pending:
                continue
            bundle = _worker_bundle(self.config)
            free = ray.available_resources()
            print(
                f"run {self.config.name}: waiting for the cluster to place {self.config.train.workers} "
                f"worker(s) of {', '.join(f'{v:g} {r}' for r, v in bundle.items())} "
                f"(available now: {', '.join(f'{free.get(r, 0):g} {r}' for r in bundle)})",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self) -> PlacementWatch:
        try:
            from ray.util import placement_group_table

            self._known = set(placement_group_table())
        except Exception:
            self._known = set()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
