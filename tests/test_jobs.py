"""`ray job submit` of jobs/train.py to a real local Ray cluster (head + worker node, token auth)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from synthetic import make_synthetic_store
from test_cluster_configs import RAY_BIN, REPO, run_script


@pytest.fixture
def cluster_env() -> Iterator[dict[str, str]]:
    temp_dir = Path(tempfile.mkdtemp(prefix="cj-", dir="/tmp"))
    try:
        up = run_script("up", temp_dir=temp_dir, timeout=400)
        assert up.returncode == 0, f"{up.stdout}\n{up.stderr}"
        exports = dict(
            line.removeprefix("export ").split("=", 1)
            for line in run_script("env", temp_dir=temp_dir).stdout.split("\n")
            if line
        )
        home = temp_dir / "home"
        home.mkdir()
        yield (
            {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(home)} | exports
        )
    finally:
        run_script("down", temp_dir=temp_dir, timeout=180)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_job_submit_trains_and_leaves_a_checkpoint(cluster_env, tmp_path):
    store = make_synthetic_store(str(tmp_path / "store"))
    runs = tmp_path / "runs"
    job = subprocess.run(
        [
            str(RAY_BIN), "job", "submit",
            "--address", cluster_env["RAY_ADDRESS"],
            "--working-dir", str(REPO),
            "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"),
            "--",
            "python", "jobs/train.py",
            "--data", store.path, "--storage", str(runs), "--name", "submitted",
            "--workers", "1", "--epochs", "2", "--set", "metrics.enabled=false",
        ],
        env=cluster_env, capture_output=True, text=True, timeout=800, cwd=tmp_path,
    )  # fmt: skip
    assert job.returncode == 0, f"{job.stdout[-4000:]}\n{job.stderr[-4000:]}"
    (job_id,) = re.findall(r"Job '(raysubmit_\w+)' succeeded", job.stdout)
    assert "epoch 2/2" in job.stdout and "latest checkpoint" in job.stdout
    status = subprocess.run(
        [str(RAY_BIN), "job", "status", "--address", cluster_env["RAY_ADDRESS"], job_id],
        env=cluster_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert f"Job '{job_id}' succeeded" in status.stdout, status.stdout + status.stderr
    checkpoint = runs / "submitted" / "epoch_0001"
    assert (checkpoint / "model.pt").stat().st_size > 0
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["epoch"] == 1 and "val/macro_f1" in state["metrics"]
