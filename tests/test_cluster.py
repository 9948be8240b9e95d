"""``cliplung/cluster.py``: a run that can never be placed fails fast, one that might later waits
and says so; the embedded cluster exports its address and a fixed capacity."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from cliplung import cli
from cliplung.cluster import NODE_TYPES_ENV, PlacementError, check_placement
from cliplung.config import load_config


def _nodes(monkeypatch, *resources, head_ip="10.0.0.1"):
    nodes = [
        {"Alive": True, "NodeManagerAddress": head_ip if i == 0 else f"10.0.0.{i + 1}", "Resources": r}
        for i, r in enumerate(resources)
    ]
    monkeypatch.setattr("cliplung.cluster.ray.nodes", lambda: nodes)
    monkeypatch.setattr(
        "cliplung.cluster.ray.get_runtime_context", lambda: SimpleNamespace(gcs_address=f"{head_ip}:6379")
    )


def _config(*extra):
    return load_config("debug", ["name=fit", *extra])


def test_a_run_that_can_never_fit_a_fixed_cluster_is_refused_naming_what_to_change(monkeypatch):
    monkeypatch.setenv(NODE_TYPES_ENV, "{}")
    _nodes(monkeypatch, {"CPU": 1.0}, {"CPU": 1.0})
    check_placement(_config("train.workers=2"))  # one worker per 1-CPU node
    with pytest.raises(PlacementError) as info:
        check_placement(_config("train.workers=4"))
    message = str(info.value)
    assert message.startswith("train.workers:")
    assert "needs 4 worker(s) of 1 CPU each" in message and "2 node(s): [CPU 1] [CPU 1]" in message
    assert "can hold 2 such worker(s)" in message and "--workers" in message
    with pytest.raises(PlacementError, match="--gpus-per-worker"):
        check_placement(_config("train.workers=1", "train.gpus_per_worker=1"))
    # A bundle must fit on one node: two 1-CPU nodes cannot hold one 2-CPU worker.
    with pytest.raises(PlacementError, match="can hold 0"):
        check_placement(_config("train.workers=1", "train.cpus_per_worker=2"))


def test_gpu_runs_fit_whole_or_fractional_gpus(monkeypatch):
    monkeypatch.setenv(NODE_TYPES_ENV, "{}")
    _nodes(monkeypatch, {"CPU": 8.0, "GPU": 2.0})
    check_placement(_config("train.workers=1", "train.gpus_per_worker=0.25"))  # a Tune trial's share
    check_placement(_config("train.workers=2", "train.gpus_per_worker=1", "train.batch_size=32"))
    with pytest.raises(PlacementError, match="can hold 2"):
        check_placement(_config("train.workers=4", "train.gpus_per_worker=1", "train.batch_size=64"))


def test_declared_node_types_count_what_an_autoscaler_can_add(monkeypatch, capsys):
    types = {"gpu-workers": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 2}}
    monkeypatch.setenv(NODE_TYPES_ENV, json.dumps(types))
    _nodes(monkeypatch, {"CPU": 0.0})  # the head offers no CPUs; no worker yet
    check_placement(_config("train.workers=2", "train.gpus_per_worker=1", "train.batch_size=32"))  # 2 GPUs
    with pytest.raises(PlacementError, match="with its autoscaler at most 3 node"):
        check_placement(_config("train.workers=4", "train.gpus_per_worker=1", "train.batch_size=64"))
    monkeypatch.setenv(NODE_TYPES_ENV, "not json")
    with pytest.raises(Exception, match=NODE_TYPES_ENV):
        check_placement(_config())


def test_unknown_growth_waits_and_says_so(monkeypatch, capsys):
    monkeypatch.delenv(NODE_TYPES_ENV, raising=False)
    _nodes(monkeypatch, {"CPU": 1.0})
    check_placement(_config("train.workers=2"))  # an autoscaler might add a node: no refusal
    assert "waits for an autoscaler" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(120)  # without the check it would wait for the placement forever
def test_eight_workers_on_the_embedded_cluster_exit_2(ray_session, synthetic_store, tmp_path, capsys):
    """The embedded cluster (4 logical CPUs when the suite's fixture started it) declares that it
    never grows."""
    import ray

    assert os.environ[NODE_TYPES_ENV] == "{}" and os.environ["RAY_ADDRESS"].startswith("127.0.0.1:")
    cpus = int(ray.cluster_resources()["CPU"])  # whichever test of this process started it
    rc = cli.main(
        [
            "train",
            "--data",
            synthetic_store.path,
            "--storage",
            str(tmp_path),
            "--name",
            "big",
            "--workers",
            "8",
        ]
    )
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT, err
    assert "needs 8 worker(s) of 1 CPU each" in err and f"can hold {cpus}" in err
