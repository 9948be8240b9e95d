"""Checks of cluster/: the `ray up` configs and the local multi-node cluster script.

The `ray up` configs are validated against the autoscaler schema that ships inside the installed
ray package (ray/autoscaler/ray-schema.json) and then through Ray's own config preparation, offline.
The script's state folder is checked against hostile set-ups (another user's folder, a symlink, a
world-writable folder, a cluster.env that holds shell code) without starting Ray. The slow tests
start cluster/local-cluster.sh for real once (a head and a worker node on 127.0.0.1 with token
authentication, next to a stale ray_current_cluster in the default temp dir), submit jobs to it (an
authenticated one, a Train V2 run that must free its placement group, metrics from both nodes), and
check that `down` leaves no process behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml
from probes import free_port
from rayenv import own_ray_env

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SCRIPT = CLUSTER / "local-cluster.sh"
RAY_CONFIGS = sorted(CLUSTER.glob("*.yaml"))
RAY_BIN = Path(sys.executable).parent / "ray"
RAY_VERSION = "2.60.0"


def _ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def test_there_is_a_ray_up_config() -> None:
    assert [p.name for p in RAY_CONFIGS] == ["aws-gpu.yaml"]


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_up_config_validates_against_the_autoscaler_schema(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, _ray_schema())


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_up_config_passes_rays_own_preparation(path: Path) -> None:
    # What `ray up` does before it talks to the cloud: fill in the provider defaults, then validate.
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]


def test_the_schema_check_can_fail() -> None:
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    config["available_node_types"]["gpu"]["max_worker"] = 4  # typo
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _ray_schema())


def test_aws_gpu_cluster() -> None:
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert types["gpu"]["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5"))
    for name, node_type in types.items():
        if name != config["head_node_type"]:
            assert node_type["min_workers"] == 0 < node_type["max_workers"] <= config["max_workers"], name
    assert config["idle_timeout_minutes"] <= 10
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    # Token authentication on every node, the token shipped by file_mounts, dashboard not public.
    assert start.count("RAY_AUTH_MODE=token ray start") == 2
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    # The package is installed without replacing the image's Ray (pinned by the constraints file).
    (setup,) = config["setup_commands"]
    assert "-c /tmp/cliplung-constraints.txt" in setup and "--no-cache-dir" in setup
    # Credentials come from an instance profile, never from this file.
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not [
        line for line in code if re.search(r"(?i)aws_(secret_access_key|access_key_id|session_token)", line)
    ]


# --------------------------------------------------------------------------- local-cluster.sh


def run_script(
    *args: str, temp_dir: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = ["bash", str(SCRIPT), *args]
    if temp_dir is not None:
        command += ["--temp-dir", str(temp_dir)]
    full_env = {**os.environ, "RAY": str(RAY_BIN), **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def test_script_syntax_and_help() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(SCRIPT)], check=True)
    result = run_script("--help")
    assert result.returncode == 0 and "up" in result.stdout and "down" in result.stdout
    assert run_script("frobnicate").returncode == 2


def test_status_and_down_without_a_cluster(tmp_path: Path) -> None:
    status = run_script("status", temp_dir=tmp_path)
    assert status.returncode == 3 and "down" in status.stdout
    for _ in range(2):  # idempotent
        down = run_script("down", temp_dir=tmp_path)
        assert down.returncode == 0, down.stderr


# A state folder someone else prepared (in a shared /tmp, before the first `up`) is refused before
# anything runs: whoever controls it controls the token and the address clients send it to. The
# check comes first for every command; these tests use the commands that never start Ray, so that
# a regression cannot leave a cluster running in a folder that is not ours.


def _refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    for word in words:
        assert word in result.stderr, result.stderr


def _untouched(folder: Path, before: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == before, "nothing may be written into a refused folder"
    assert _naming(folder) == [], "no process may have been started for it"


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder that belongs to another user needs root")
@pytest.mark.parametrize("command", ["status", "env", "down"])
def test_a_state_folder_of_another_user_is_refused(tmp_path: Path, command: str) -> None:
    hostile = tmp_path / "theirs"
    hostile.mkdir(mode=0o700)
    (hostile / "cluster.env").write_text("GCS_PORT=6379\n")
    os.chown(hostile, 65534, 65534)
    _refused(run_script(command, temp_dir=hostile, timeout=60), str(hostile), "belongs to uid 65534")
    _untouched(hostile, {"cluster.env"})


@pytest.mark.parametrize("trailing_slash", [False, True])
def test_a_symlinked_state_folder_is_refused(tmp_path: Path, trailing_slash: bool) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o700)  # even one of our own: the link could be swapped for another
    link = tmp_path / "link"
    link.symlink_to(target)
    arg = Path(f"{link}/") if trailing_slash else link
    _refused(run_script("status", temp_dir=arg, timeout=60), "symbolic link")
    _untouched(target, set())


def test_a_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    _refused(run_script("env", temp_dir=shared, timeout=60), "writable by group or others")
    _untouched(shared, set())
    # Nor one whose parent lets others rename it away (a sticky /tmp is fine).
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)
    _refused(run_script("status", temp_dir=open_parent / "state", timeout=60), "lets others replace")
    assert not (open_parent / "state").exists()


def test_the_state_folder_is_created_private(tmp_path: Path) -> None:
    fresh = tmp_path / "a" / "fresh"
    assert run_script("status", temp_dir=fresh).returncode == 3
    assert fresh.stat().st_mode & 0o777 == 0o700
    readable = tmp_path / "readable"  # what older versions of the script left behind
    readable.mkdir(mode=0o755)
    readable.chmod(0o755)
    assert run_script("status", temp_dir=readable).returncode == 3
    assert readable.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("GCS_PORT=$(touch {pwned})", ["line 1", "expected KEY=PORT"]),
        ("GCS_PORT=1; touch {pwned}", ["line 1", "expected KEY=PORT"]),
        ("`touch {pwned}`", ["line 1", "expected KEY=PORT"]),
        ("PATH=1", ["line 1", "unknown key PATH"]),
        ("GCS_PORT=70000", ["line 1", "GCS_PORT=70000 is not a port"]),
        ("GCS_PORT=6379", ["BASE_PORT is missing"]),
    ],
)
def test_cluster_env_is_parsed_never_run(tmp_path: Path, line: str, words: list[str]) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    pwned = tmp_path / "pwned"
    (state / "cluster.env").write_text(line.format(pwned=pwned) + "\n")
    for command in ("env", "status"):
        result = run_script(command, temp_dir=state, timeout=60)
        _refused(result, str(state / "cluster.env"), *words)
        assert not pwned.exists(), "cluster.env was run as shell code"


def _session_members(sids: set[int]) -> list[str]:
    """`pid command` of every process in the given sessions."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,sid=,args="], capture_output=True, text=True, check=True
    ).stdout
    members = []
    for line in out.splitlines():
        pid, sid, *args = line.split(None, 2)
        if int(sid) in sids:
            members.append(" ".join([pid, *args]))
    return members


def _naming(path: Path) -> list[str]:
    """Processes whose command line names `path`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(path).encode() in a for a in args):
            found.append(f"{proc.name} {b' '.join(args).decode(errors='replace')[:200]}")
    return found


@dataclass
class LocalCluster:
    temp_dir: Path
    up: subprocess.CompletedProcess[str]
    sids: set[int]
    ports: dict[str, str]
    exports: dict[str, str]
    client_env: dict[str, str]

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.ports['DASHBOARD_PORT']}"

    def submit(self, *entrypoint: str, working_dir: Path, timeout: float = 300) -> tuple[str, str]:
        """(job id, output) of a job that succeeded."""
        job = subprocess.run(
            [str(RAY_BIN), "job", "submit", "--address", self.address, "--working-dir", str(working_dir),
             "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"), "--", *entrypoint],
            env=self.client_env, capture_output=True, text=True, timeout=timeout, cwd=self.temp_dir,
        )  # fmt: skip
        assert job.returncode == 0, f"{job.stdout[-6000:]}\n{job.stderr[-3000:]}"
        (job_id,) = re.findall(r"Job '(raysubmit_\w+)' succeeded", job.stdout)
        return job_id, job.stdout


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[LocalCluster]:
    """One `local-cluster.sh up` for the slow tests below; the last of them takes it down."""
    # A short private dir: Ray puts Unix sockets under it, and only this cluster's processes name it.
    temp_dir = Path(tempfile.mkdtemp(prefix="cl-", dir="/tmp"))
    # What a user's machine often has: the default temp dir's ray_current_cluster naming a cluster
    # that is long gone (here: a port nobody listens on). Ray's own address discovery reads it.
    default_tmp = temp_dir / "default-tmp"
    (default_tmp / "ray").mkdir(parents=True)
    (default_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    try:
        up = run_script("up", temp_dir=temp_dir, timeout=400, env={"RAY_TMPDIR": str(default_tmp)})
        assert up.returncode == 0, f"{up.stdout}\n{up.stderr}"
        sids = {int((temp_dir / f"{node}.pid").read_text()) for node in ("head", "worker")}
        ports = dict(line.split("=", 1) for line in (temp_dir / "cluster.env").read_text().split())
        exports = dict(
            line.removeprefix("export ").split("=", 1)
            for line in run_script("env", temp_dir=temp_dir).stdout.split("\n")
            if line
        )
        # A fresh HOME so no ~/.ray/auth_token of the user's can stand in for the cluster's token.
        home = temp_dir / "home"
        home.mkdir()
        client_env = own_ray_env() | {"HOME": str(home)}
        yield LocalCluster(temp_dir, up, sids, ports, exports, client_env | exports)
    finally:
        run_script("down", temp_dir=temp_dir, timeout=180)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_cluster_runs_an_authenticated_job(local_cluster: LocalCluster) -> None:
    cluster = local_cluster
    assert cluster.address in cluster.up.stdout and "ray job submit" in cluster.up.stdout
    status = run_script("status", temp_dir=cluster.temp_dir)
    assert status.returncode == 0, status.stderr
    assert len(re.findall(r"^\s*1 node_", status.stdout, re.M)) == 2, status.stdout
    again = run_script("up", temp_dir=cluster.temp_dir)
    assert again.returncode == 0 and "already up" in again.stdout

    assert cluster.exports["RAY_AUTH_MODE"] == "token"
    token = Path(cluster.exports["RAY_AUTH_TOKEN_PATH"])
    assert (token.stat().st_mode & 0o077) == 0, "the token file is private"
    assert (cluster.temp_dir.stat().st_mode & 0o777) == 0o700, "the state folder is private"

    job_id, out = cluster.submit(
        "python", "-c", "print('hello from cliplung')", working_dir=cluster.temp_dir / "home"
    )
    assert "hello from cliplung" in out
    status_of_job = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from ray.job_submission import JobSubmissionClient; "
            "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)",
            cluster.address,
            job_id,
        ],
        env=cluster.client_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status_of_job.stdout.strip() == "SUCCEEDED", status_of_job.stdout + status_of_job.stderr

    # Without the token the job API refuses.
    anonymous = subprocess.run(
        [str(RAY_BIN), "job", "list", "--address", cluster.address],
        env={k: v for k, v in cluster.client_env.items() if not k.startswith("RAY_")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert anonymous.returncode != 0
    assert (
        "Unauthorized" in anonymous.stdout + anonymous.stderr or "401" in anonymous.stdout + anonymous.stderr
    )


PLACEMENT_GROUP_JOB = """
import json, sys, time

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.util.state import list_actors


def loop():
    ray.train.report({"done": 1})


ray.init()
DataParallelTrainer(
    loop, scaling_config=ScalingConfig(num_workers=1), run_config=RunConfig(name="pg", storage_path=sys.argv[1])
).fit()
# Train V2 stops its detached PlacementGroupCleaner when the run ends; a cleaner that cannot reach
# the GCS hangs instead (and the controller logs "Failed to stop PlacementGroupCleaner").
deadline = time.monotonic() + 60
while True:
    cleaners = [a.state for a in list_actors(filters=[("class_name", "=", "PlacementGroupCleaner")])]
    if (cleaners and all(s == "DEAD" for s in cleaners)) or time.monotonic() > deadline:
        break
    time.sleep(1)
print("CLEANERS " + json.dumps(cleaners))
"""

CLEANER_FAILURES = (
    "Timed out while waiting for GCS to become available",
    "Failed to stop PlacementGroupCleaner",
    "Monitor thread did not exit",
    "Failed to query placement group table",
)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_v2_cleans_up_its_placement_group(local_cluster: LocalCluster, tmp_path: Path) -> None:
    script = tmp_path / "pg_job.py"
    script.write_text(PLACEMENT_GROUP_JOB)
    _, out = local_cluster.submit("python", script.name, str(tmp_path / "runs"), working_dir=tmp_path)
    for text in CLEANER_FAILURES:
        assert text not in out, f"job log has {text!r}:\n{out[-6000:]}"
    (cleaners,) = re.findall(r"^CLEANERS (.*)$", out, re.M)
    assert json.loads(cleaners) == ["DEAD"], out[-4000:]
    # After the job: no placement group of it is left holding resources.
    listing = subprocess.run(
        [sys.executable, "-c",
         "import json, sys; from ray.util.state import list_placement_groups; "
         "print(json.dumps([p.state for p in list_placement_groups(address=sys.argv[1])]))",
         local_cluster.address],
        env=local_cluster.client_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    states = json.loads(listing.stdout.strip().splitlines()[-1])
    assert states and set(states) == {"REMOVED"}, states


TWO_NODE_METRICS_JOB = """
import json, sys, urllib.request

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cliplung.config import MetricsConfig

port = int(sys.argv[1])


@ray.remote(num_cpus=1)
def report(rank):
    from cliplung.train.prometheus import WorkerMetrics

    metrics = WorkerMetrics("two-nodes", rank, MetricsConfig(port=port))
    metrics.epoch(1, {"loss": 0.5}, {"accuracy": 0.5}, samples_per_second=10.0)
    if metrics.actor is not None:
        ray.get(metrics.actor.workers.remote())  # the report above has arrived
    return ray.get_runtime_context().get_node_id(), metrics.actor is not None


ray.init()
nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
strategy = [NodeAffinitySchedulingStrategy(n, soft=False) for n in nodes]
results = ray.get([report.options(scheduling_strategy=s).remote(i) for i, s in enumerate(strategy)])
with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
    text = response.read().decode()
print("RESULT " + json.dumps({"nodes": nodes, "results": results, "metrics": text}))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_both_nodes_on_one_host_export_metrics(local_cluster: LocalCluster, tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    script = tmp_path / "metrics_job.py"
    script.write_text(TWO_NODE_METRICS_JOB)
    port = free_port()
    _, out = local_cluster.submit("python", str(script), str(port), working_dir=REPO)
    (raw,) = re.findall(r"^RESULT (.*)$", out, re.M)
    result = json.loads(raw)
    assert len(result["nodes"]) == 2
    assert sorted(node for node, _ in result["results"]) == result["nodes"], "one reporter per node"
    assert all(ok for _, ok in result["results"]), out[-4000:]
    epochs = {
        s.labels["rank"]: s.value
        for family in text_string_to_metric_families(result["metrics"])
        for s in family.samples
        if s.name == "cliplung_epoch" and s.labels["run"] == "two-nodes"
    }
    assert epochs == {"0": 1.0, "1": 1.0}, "the workers of both nodes reach one endpoint"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_job_too_big_for_the_two_nodes_fails_at_once(local_cluster: LocalCluster, synthetic_store) -> None:
    """A run asking for more than the two 1-CPU nodes hold exits 2 before any worker starts instead
    of waiting forever. (The README's own job, the debug preset's 2 workers, one per node, runs as
    printed in the README test, `make test-readme`.)"""
    runs = local_cluster.temp_dir / "runs"
    common = ["--data", synthetic_store.path, "--storage", str(runs)]
    too_big = subprocess.run(
        [str(RAY_BIN), "job", "submit", "--address", local_cluster.address, "--working-dir", str(REPO),
         "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"), "--",
         "python", "jobs/train.py", *common, "--name", "too-big", "--workers", "4"],
        env=local_cluster.client_env, capture_output=True, text=True, timeout=300, cwd=local_cluster.temp_dir,
    )  # fmt: skip
    assert too_big.returncode != 0
    assert "needs 4 worker(s) of 1 CPU each" in too_big.stdout and "can hold 2" in too_big.stdout
    assert not (runs / "too-big" / "epoch_0000").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_prepare_submitted_to_the_two_node_cluster_runs_scans_on_both_nodes(
    local_cluster: LocalCluster,
) -> None:
    """`jobs/prepare.py` through `ray job submit`: every scan is a Ray task, both nodes run some, and
    the store's bytes equal a serial build's (issue 13 item 7)."""
    from test_data_prepare import _array_objects, _phantom

    from cliplung.data.prepare import prepare_store
    from cliplung.data.store import POINTER, NoduleStore

    out = local_cluster.temp_dir / "store"
    _, stdout = local_cluster.submit(
        "python", "jobs/prepare.py", "--source", "phantom", "--limit", "6", "--folds", "2", "--out", str(out),
        working_dir=REPO, timeout=800,
    )  # fmt: skip
    assert "executor ray" in stdout
    (nodes,) = re.findall(r"nodes\s+(\d+) Ray nodes ran scans", stdout)
    assert nodes == "2", stdout[-3000:]
    clean = local_cluster.temp_dir / "clean"
    prepare_store(_phantom(limit=6), str(clean), progress=False, executor="serial")
    assert _array_objects(out) == _array_objects(clean)
    assert json.loads((out / POINTER).read_text())["version"] == NoduleStore.open(str(out)).version


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_down_stops_every_process_it_started(local_cluster: LocalCluster) -> None:
    # Last test of the module: it takes the shared cluster down.
    cluster = local_cluster
    assert any("raylet" in m for m in _session_members(cluster.sids))
    assert any("gcs_server" in m for m in _session_members(cluster.sids))
    down = run_script("down", temp_dir=cluster.temp_dir, timeout=180)
    assert down.returncode == 0, down.stderr
    assert _session_members(cluster.sids) == []
    assert _naming(cluster.temp_dir / "ray") == []
    assert not (cluster.temp_dir / "auth_token").exists()
    assert run_script("status", temp_dir=cluster.temp_dir).returncode == 3
