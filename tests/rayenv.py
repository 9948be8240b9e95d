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

:func:`ray_head` starts a Ray head of a test's own (``ray start --head --block``) and stops it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from probes import free_port

RAY_TRAIN_TEST_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def own_ray_env() -> dict[str, str]:
    """This process's environment without the caller's Ray settings (``RAY_ADDRESS``, auth, temp
    dirs: a cluster or driver of its own sets those), with the suite's Ray Train settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | RAY_TRAIN_TEST_ENV


@contextlib.contextmanager
def ray_head(prefix: str, *args: str, env: dict[str, str] | None = None, hook: str | None = None):
    """A Ray head of its own, as another user's or a test cluster would be: ``ray start --head
    --block`` with its own temp dir (``prefix``: short, Ray's socket paths must fit), port and
    token, plus ``args``. ``env``: its environment (default :func:`own_ray_env`); ``hook``: the
    text of a ``sitecustomize.py`` every process of the cluster imports. Yields (address,
    environment for its drivers). Stopped by its pid, then anything of its process group left.

    The stop signals the ``ray start`` process only: it tears its node down on SIGTERM (about 2 s).
    Signalling the whole group instead kills the node's processes under it, and ``ray start`` then
    waits for them without end (measured: still running 30 s later). On SIGTERM Ray 2.60 first
    drains the node until no worker holds a lease, for up to ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S``
    (30 s; for Serve replicas on a deleted pod); Ray Data's detached actors (autoscaling
    coordinator, stats, usage) hold a node for good once a job used Ray Data, so every stop waited
    the whole 30 s (measured: 31.6 s after a Ray Data job, 2.2 s after a plain task). A test head
    has nothing to drain: 0 turns the drain off."""
    temp = Path(tempfile.mkdtemp(prefix=prefix))
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    port = free_port()
    env = dict(own_ray_env() if env is None else env)
    env.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"
    )
    if hook is not None:
        (temp / "hook").mkdir()
        (temp / "hook" / "sitecustomize.py").write_text(hook)
        env["PYTHONPATH"] = os.pathsep.join([str(temp / "hook"), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    ray_bin = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp}",
         "--disable-usage-stats", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, f"ray start {' '.join(args)} did not start"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", env | {"RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what a node left behind, if anything
        proc.wait()
        shutil.rmtree(temp, ignore_errors=True)
