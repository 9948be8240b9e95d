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

``address="local"`` is passed explicitly: a bare ``ray.init()`` joins whatever cluster Ray's
``ray_current_cluster`` file names, even a head that died long ago. :func:`shutdown_ray` stops
what :func:`ensure_ray` started and takes the exported address back out of the environment.
"""

from __future__ import annotations

import os
import socket

import ray
import ray.data

__all__ = ["LOOPBACK", "ensure_ray", "shutdown_ray"]

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
    for name in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT"):
        if name not in _exported:
            continue
        before = _exported.get(f"_before_{name}")
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
    _exported.clear()
