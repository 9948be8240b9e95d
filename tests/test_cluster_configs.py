"""Checks of cluster/: the `ray up` configs and the local multi-node cluster script.

The `ray up` configs are validated against the autoscaler schema that ships inside the installed
ray package (ray/autoscaler/ray-schema.json) and then through Ray's own config preparation, offline.
The slow test starts cluster/local-cluster.sh for real (a head and a worker node on 127.0.0.1 with
token authentication), submits a job, and checks that `down` leaves no process behind.
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
from pathlib import Path

import jsonschema
import pytest
import yaml

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
    *args: str, temp_dir: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    command = ["bash", str(SCRIPT), *args]
    if temp_dir is not None:
        command += ["--temp-dir", str(temp_dir)]
    env = {**os.environ, "RAY": str(RAY_BIN)}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


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


@pytest.fixture
def local_cluster() -> Iterator[Path]:
    # A short private dir: Ray puts Unix sockets under it, and only this cluster's processes name it.
    temp_dir = Path(tempfile.mkdtemp(prefix="cl-", dir="/tmp"))
    try:
        yield temp_dir
    finally:
        run_script("down", temp_dir=temp_dir, timeout=180)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_cluster_runs_an_authenticated_job_and_goes_away(local_cluster: Path) -> None:
    temp_dir = local_cluster
    up = run_script("up", temp_dir=temp_dir, timeout=400)
    assert up.returncode == 0, f"{up.stdout}\n{up.stderr}"
    sids = {int((temp_dir / f"{node}.pid").read_text()) for node in ("head", "worker")}
    ports = dict(line.split("=", 1) for line in (temp_dir / "cluster.env").read_text().split())
    address = f"http://127.0.0.1:{ports['DASHBOARD_PORT']}"
    assert address in up.stdout and "ray job submit" in up.stdout

    status = run_script("status", temp_dir=temp_dir)
    assert status.returncode == 0, status.stderr
    assert len(re.findall(r"^\s*1 node_", status.stdout, re.M)) == 2, status.stdout
    again = run_script("up", temp_dir=temp_dir)
    assert again.returncode == 0 and "already up" in again.stdout

    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in run_script("env", temp_dir=temp_dir).stdout.split("\n")
        if line
    )
    assert exports["RAY_AUTH_MODE"] == "token"
    assert (Path(exports["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o077) == 0, "the token file is private"
    # A fresh HOME so no ~/.ray/auth_token of the user's can stand in for the cluster's token.
    home = temp_dir / "home"
    home.mkdir()
    client_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(home)}

    job = subprocess.run(
        [
            str(RAY_BIN),
            "job",
            "submit",
            "--address",
            address,
            "--",
            "python",
            "-c",
            "print('hello from cliplung')",
        ],
        env=client_env | exports,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=temp_dir,
    )
    assert job.returncode == 0, f"{job.stdout}\n{job.stderr}"
    assert "hello from cliplung" in job.stdout
    (job_id,) = re.findall(r"Job '(raysubmit_\w+)' succeeded", job.stdout)
    status_of_job = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from ray.job_submission import JobSubmissionClient; "
            "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)",
            address,
            job_id,
        ],
        env=client_env | exports,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status_of_job.stdout.strip() == "SUCCEEDED", status_of_job.stdout + status_of_job.stderr

    # Without the token the job API refuses.
    anonymous = subprocess.run(
        [str(RAY_BIN), "job", "list", "--address", address],
        env=client_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert anonymous.returncode != 0
    assert (
        "Unauthorized" in anonymous.stdout + anonymous.stderr or "401" in anonymous.stdout + anonymous.stderr
    )

    assert any("raylet" in m for m in _session_members(sids))
    assert any("gcs_server" in m for m in _session_members(sids))
    down = run_script("down", temp_dir=temp_dir, timeout=180)
    assert down.returncode == 0, down.stderr
    assert _session_members(sids) == []
    assert _naming(temp_dir / "ray") == []
    assert not (temp_dir / "auth_token").exists()
    assert run_script("status", temp_dir=temp_dir).returncode == 3
