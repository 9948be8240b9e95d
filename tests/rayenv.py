"""Ray Train settings of every Ray process the suite starts, and the environment for a cluster or
driver of its own.

Both settings are Ray Train V2's documented environment variables, which Ray Train propagates from
the driver to its controller and workers:

* ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.25``: the controller polls its worker group every 0.25 s
  instead of every 2 s, so the end of a run (and its start) is seen at once. A test trains for a
  few seconds, so the default interval is a large share of each run.
* ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``: no preemption-watcher actor (one more process per
  run). No node of a test cluster is ever drained by a cloud provider; cliplung does not use it.

Everything else (placement, failure handling, checkpoints) is Ray's default, as in production.
"""

from __future__ import annotations

import os

RAY_TRAIN_TEST_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def own_ray_env() -> dict[str, str]:
    """This process's environment without the caller's Ray settings (``RAY_ADDRESS``, auth, temp
    dirs: a cluster or driver of its own sets those), with the suite's Ray Train settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | RAY_TRAIN_TEST_ENV
