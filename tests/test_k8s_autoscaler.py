"""Ray's autoscaler scales the base RayCluster's groups, on Ray's fake multi-node provider.

No Kubernetes here, so the pods are replaced by Ray's ``fake_multinode`` provider (part of Ray: it
starts each "node" as a set of Ray processes on this machine) while the decisions are made by the
real autoscaler (``monitor.py``) that a KubeRay head runs as its sidecar. The node types are the
ones Ray's KubeRay translation derives from ``k8s/base``'s RayCluster (test_k8s_manifests.py's
:func:`ray_view`), scaled down to fit two cores: at most one CPU and one node per group, no
``memory`` resource (a fake node cannot back 24 GiB), a short idle timeout. The GPUs are fake
``GPU`` resources; the job asks for one and does no CUDA work.

The test starts the head in a session of its own, with its own temp dir, ports and token, and
stops exactly the processes of that session and those naming its temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from probes import free_port
from rayenv import own_ray_env
from test_cluster_configs import RAY_BIN, _naming
from test_k8s_manifests import HEAD, _cluster, ray_view

FAKE_HEAD = "ray.head.default"  # the head node type the fake provider reports
IDLE_TIMEOUT_MINUTES = 0.1  # the RayCluster says 5; a test cannot wait that long

GPU_JOB = """
import json
import ray

ray.init()


@ray.remote(num_gpus=1)
def where():
    # No CUDA here: the GPU is a logical resource of a fake node.
    return ray.get_gpu_ids(), ray.get_runtime_context().get_node_id()


print("RESULT " + json.dumps(ray.get(where.remote(), timeout=180)))
"""


def fake_node_types(view: dict) -> dict:
    """Ray's node types for the RayCluster, scaled down to fit a 2-core machine."""
    types = {}
    for name, node in view["available_node_types"].items():
        resources = node["resources"]
        if name == HEAD:
            types[FAKE_HEAD] = {"resources": {"CPU": resources["CPU"]}, "node_config": {}, "max_workers": 0}
            continue
        fake = {"CPU": min(resources["CPU"], 1), "object_store_memory": 100_000_000}
        if "GPU" in resources:
            fake["GPU"] = resources["GPU"]
        types[name] = {
            "resources": fake,
            "node_config": {},
            "min_workers": min(node["min_workers"], 1),
            "max_workers": min(node["max_workers"], 1),
        }
    return types


def autoscaling_config(view: dict, gcs_address: str) -> dict:
    """A complete fake_multinode config (the wheel lacks the provider's example.yaml)."""
    types = fake_node_types(view)
    return {
        "cluster_name": "cliplung-fake",
        "max_workers": sum(t["max_workers"] for t in types.values()),
        "upscaling_speed": view["upscaling_speed"],
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": types,
        "head_node_type": FAKE_HEAD,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def active_nodes(status: str) -> dict[str, int]:
    """Node type -> count in the "Active:" block of `ray status`."""
    block = status.split("Active:", 1)[1].split("Pending:", 1)[0] if "Active:" in status else ""
    return {name: int(count) for count, name in re.findall(r"^\s*(\d+) (\S+)\s*$", block, re.M)}


class FakeCluster:
    def __init__(self, root: Path, view: dict) -> None:
        self.root = root
        self.gcs = f"127.0.0.1:{free_port()}"
        self.config = autoscaling_config(view, self.gcs)
        (root / "autoscaling.json").write_text(json.dumps(self.config))
        token = root / "auth_token"
        token.write_text(os.urandom(32).hex())
        token.chmod(0o600)
        self.env = own_ray_env() | {
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_ADDRESS": self.gcs,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",
            # Fixed defaults (44217, 44227) would clash with any other Ray on the machine.
            "AUTOSCALER_METRIC_PORT": str(free_port()),
            "DASHBOARD_METRIC_PORT": str(free_port()),
        }
        self.head: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(RAY_BIN), "start", "--head", "--block", "--disable-usage-stats",
            "--port", self.gcs.rsplit(":", 1)[1], "--node-ip-address", "127.0.0.1",
            "--temp-dir", str(self.root / "ray"), "--autoscaling-config", str(self.root / "autoscaling.json"),
            "--num-cpus", str(self.config["available_node_types"][FAKE_HEAD]["resources"]["CPU"]),
            "--num-gpus", "0", "--object-store-memory", "100000000", "--include-dashboard", "false",
            "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        ]  # fmt: skip
        with open(self.root / "head.log", "w") as log:
            self.head = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def status(self) -> str:
        result = subprocess.run(
            [str(RAY_BIN), "status", "--address", self.gcs],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result.stdout

    def wait_for(self, want: dict[str, int], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            assert self.head is not None and self.head.poll() is None, (self.root / "head.log").read_text()[
                -3000:
            ]
            status = self.status()
            if active_nodes(status) == want:
                return status
            time.sleep(1)
        raise AssertionError(f"waited {timeout:.0f}s for {want}; last `ray status`:\n{status}")

    def processes(self) -> list[int]:
        """Every process of this cluster: the head's session, and anything naming its temp dir
        (worker nodes the autoscaler started, whatever became of their parents)."""
        pids = set()
        if self.head is not None:
            out = subprocess.run(
                ["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True
            ).stdout
            pids |= {
                int(pid)
                for pid, sid in (line.split() for line in out.splitlines())
                if int(sid) == self.head.pid
            }
        pids |= {int(entry.split()[0]) for entry in _naming(self.root / "ray")}
        return sorted(p for p in pids if p != os.getpid() and not _is_zombie(p))

    def stop(self) -> list[int]:
        """Stop exactly this cluster's processes; the pids still alive afterwards."""
        if self.head is None:
            return []
        if self.head.poll() is None:
            self.head.send_signal(signal.SIGTERM)  # `ray start --block` tears its node down
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.head.wait(timeout=30)
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            left = self.processes()
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.5)
        if self.head.poll() is None:
            self.head.wait(timeout=5)
        return self.processes()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@pytest.fixture
def fake_cluster() -> Iterator[FakeCluster]:
    # Short: Ray puts Unix sockets under it.
    root = Path(tempfile.mkdtemp(prefix="fa-", dir="/tmp"))
    cluster = FakeCluster(root, ray_view(_cluster("base")))
    try:
        yield cluster
    finally:
        left = cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        assert left == [], f"processes of the fake cluster still running: {left}"


def test_the_fake_node_types_follow_the_raycluster() -> None:
    types = fake_node_types(ray_view(_cluster("base")))
    assert types == {
        FAKE_HEAD: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "cpu": {
            "resources": {"CPU": 1, "object_store_memory": 100_000_000},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 1,
        },
        "gpu": {
            "resources": {"CPU": 1, "object_store_memory": 100_000_000, "GPU": 1},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 1,
        },
    }
    from ray.autoscaler._private.util import validate_config

    validate_config(autoscaling_config(ray_view(_cluster("base")), "127.0.0.1:1"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_autoscaler_launches_a_gpu_node_and_gives_it_back(
    fake_cluster: FakeCluster, tmp_path: Path
) -> None:
    fake_cluster.start()
    started = time.monotonic()
    # The head offers no CPUs and every group's minimum is 0: nothing but the head at first.
    fake_cluster.wait_for({FAKE_HEAD: 1}, timeout=90)

    script = tmp_path / "gpu_job.py"
    script.write_text(GPU_JOB)
    job = subprocess.run(
        [sys.executable, str(script)], env=fake_cluster.env, capture_output=True, text=True, timeout=240
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    (raw,) = re.findall(r"^RESULT (.*)$", job.stdout, re.M)
    gpu_ids, node_id = json.loads(raw)
    assert gpu_ids == [0]
    assert not node_id.endswith("00000"), "the task ran on a launched node, not on the head"
    assert "Adding 1 node(s) of type gpu" in job.stdout + job.stderr, job.stdout + job.stderr
    scaled_up = time.monotonic()

    # Idle for idle_timeout_minutes: the GPU group goes back to its minimum, 0.
    status = fake_cluster.wait_for({FAKE_HEAD: 1}, timeout=IDLE_TIMEOUT_MINUTES * 60 + 90)
    assert "gpu" not in active_nodes(status)
    # Ray's autoscaler decided it, for that node, because it was idle.
    monitor_log = (fake_cluster.root / "ray" / "session_latest" / "logs" / "monitor.log").read_text()
    assert "Removing 1 nodes of type gpu (idle)" in monitor_log
    assert re.search(rf"Terminating the node with id {node_id} .*\(idle\)", monitor_log)
    print(
        f"up {scaled_up - started:.0f}s after start, back to the minimum {time.monotonic() - scaled_up:.0f}s later"
    )
