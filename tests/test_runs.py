"""The run layer (``cliplung/runs.py``): the run record and resume identity, checkpoints found
through Ray's record or a bare folder, the lease (local; the S3 lease is tested against the real
S3 server in ``test_s3_runs.py``), and one override path for the CLI flags."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from synthetic import make_synthetic_store

from cliplung import cli
from cliplung.config import apply_overrides, load_config
from cliplung.data.ingest import compute_splits
from cliplung.runs import (
    LEASE_FILE,
    CheckpointError,
    CheckpointInfo,
    Run,
    RunError,
    best_of,
    config_differences,
    store_identity,
)

REPO = Path(__file__).resolve().parents[1]


def _config(store_path: str, storage: Path, name: str = "r", *extra: str):
    return load_config(
        "debug",
        [
            f"data.store={store_path}",
            f"storage.path={storage}",
            f"name={name}",
            "metrics.enabled=false",
            *extra,
        ],
    )


def _start(config, store) -> bool:
    splits = compute_splits(store, config.data).record(config.data.store)
    return Run.of(config).start(config, kind="train", store=store, splits=splits)


# --------------------------------------------------------------------------- record and identity


def test_run_record_is_written_once_and_a_resume_may_change_only_what_is_allowed(synthetic_store, tmp_path):
    config = _config(synthetic_store.path, tmp_path)
    assert _start(config, synthetic_store) is False
    run = Run.of(config)
    record = run.record()
    assert record["kind"] == "train" and record["store"] == store_identity(synthetic_store)
    splits_before = (tmp_path / "r" / "splits.json").read_bytes()
    config_before = (tmp_path / "r" / "config.yaml").read_bytes()

    # More epochs, other workers, another storage of the same run, other metrics: a resume.
    allowed = apply_overrides(config, ["train.epochs=9", "train.workers=1", "metrics.port=9999"])
    assert _start(allowed, synthetic_store) is True
    assert (tmp_path / "r" / "splits.json").read_bytes() == splits_before
    assert (tmp_path / "r" / "config.yaml").read_bytes() == config_before

    for override, field in (
        ("model.n_ctx=8", "model.n_ctx: was 4, now 8"),
        ("data.test_fold=1", "data.test_fold: was 0, now 1"),
        ("train.lr=0.5", "train.lr: was 0.003, now 0.5"),
        ("prepare.patch_size=32", "prepare.patch_size"),
    ):
        with pytest.raises(RunError, match="another store or config") as info:
            _start(apply_overrides(config, [override]), synthetic_store)
        assert field in str(info.value) and "new --name" in str(info.value)
    assert (tmp_path / "r" / "splits.json").read_bytes() == splits_before


def test_another_store_under_the_same_name_is_refused(synthetic_store, tmp_path):
    import shutil

    config = _config(synthetic_store.path, tmp_path)
    _start(config, synthetic_store)
    other = make_synthetic_store(str(tmp_path / "other"), n_patients=30)
    with pytest.raises(RunError, match="another store or config") as info:
        _start(apply_overrides(config, [f"data.store={other.path}"]), other)
    assert "store num_nodules: run has 80, now 60" in str(info.value)
    assert "store patients_folds_sha256" in str(info.value)
    # The same store read from another place (a copy) is the same store.
    shutil.copytree(synthetic_store.path, tmp_path / "copy")
    from cliplung.data.store import NoduleStore

    copy = NoduleStore.open(str(tmp_path / "copy"))
    assert _start(apply_overrides(config, [f"data.store={copy.path}"]), copy) is True


def test_config_differences_names_fields_and_honours_sections():
    a = {"train": {"lr": 1, "epochs": 2}, "model": {"n_ctx": 4}, "metrics": {"port": 1}}
    b = {"train": {"lr": 2, "epochs": 3}, "model": {"n_ctx": 4}, "metrics": {"port": 2}}
    assert config_differences(a, b, ("train.epochs", "metrics")) == ["train.lr: was 1, now 2"]


# --------------------------------------------------------------------------- checkpoints


def _folder_run(root: Path, scores: list[float | None]) -> Run:
    for epoch, score in enumerate(scores):
        ckpt = root / "run" / f"epoch_{epoch:04d}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.pt").write_bytes(b"x")
        metrics = {} if score is None else {"val/macro_f1": score}
        (ckpt / "train_state.json").write_text(json.dumps({"epoch": epoch, "metrics": metrics}))
    return Run(str(root), "run")


def test_a_bare_folder_of_checkpoints_still_works(tmp_path):
    run = _folder_run(tmp_path, [0.2, 0.5, None, 0.5])
    (tmp_path / "run" / "epoch_0009").mkdir()  # a copy in progress: no model.pt
    found = run.checkpoints()
    assert [c.epoch for c in found] == [0, 1, 2, 3]
    assert run.latest_checkpoint().epoch == 3
    assert run.best_checkpoint("val/macro_f1", "max").epoch == 3  # ties go to the later epoch
    assert run.best_checkpoint("val/macro_f1", "min").epoch == 0
    with pytest.raises(CheckpointError, match="test metric"):
        run.best_checkpoint("test/macro_f1", "max")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Run(str(tmp_path), "empty").best_checkpoint()


def test_best_of_skips_non_finite_values():
    infos = [
        CheckpointInfo("a", 0, {"m": float("nan")}),
        CheckpointInfo("b", 1, {"m": 0.1}),
        CheckpointInfo("c", 2, {"m": float("inf")}),
        CheckpointInfo("d", 3, {"m": True}),
    ]
    assert best_of(infos, "m", "max").location == "b"
    assert best_of(infos[:1], "m", "max") is None


# --------------------------------------------------------------------------- the lease


def test_a_second_lease_is_refused_naming_the_holder_and_released_on_exit(tmp_path):
    run = Run(str(tmp_path), "leased")
    with run.lease(purpose="first"):
        holder = json.loads((tmp_path / "leased" / LEASE_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["purpose"] == "first"
        with pytest.raises(RunError, match=rf"pid {os.getpid()}, first since") as info:
            run.lease(purpose="second").acquire()
        assert "another --name" in str(info.value)
    assert not (tmp_path / "leased" / LEASE_FILE).exists()
    with run.lease(purpose="again"):
        pass


def test_an_abandoned_or_dead_lease_is_taken_over(tmp_path, capsys):
    run = Run(str(tmp_path), "stale")
    lease = run.lease(purpose="old")
    lease.acquire()
    lease._stop.set()  # the holder stops heartbeating (frozen, or its host died)
    path = tmp_path / "stale" / LEASE_FILE
    holder = json.loads(path.read_text())
    holder.update(host="some-other-host", heartbeat=time.time() - 3600)
    path.write_text(json.dumps(holder))
    with run.lease(purpose="new") as new:
        assert "taking over the lease" in capsys.readouterr().err
        assert new.holder["purpose"] == "new"
        lease.renew()  # the old holder's next heartbeat finds it lost, and says so
        assert lease.lost.is_set()

    # A holder on this host whose process is gone is dead at once, whatever its heartbeat.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        json.dumps(
            {"host": os.uname().nodename, "pid": int(dead.stdout), "heartbeat": time.time(), "token": "x"}
        )
    )
    with run.lease(purpose="after-crash"):
        assert "taking over" in capsys.readouterr().err

    # A lease this process left behind (its release could not reach the storage) is no obstacle.
    path.write_text(
        json.dumps(
            {"host": os.uname().nodename, "pid": os.getpid(), "heartbeat": time.time(), "token": "old"}
        )
    )
    with run.lease(purpose="rerun-in-process"):
        assert "taking over" in capsys.readouterr().err


def test_a_heartbeat_whose_answer_was_lost_keeps_the_lease(tmp_path):
    """The stored lease is this holder's own under a version it never saw (a write that landed
    while its answer was lost, then retried): the next heartbeat adopts it instead of calling the
    lease lost; another holder's token is still a loss."""
    run = Run(str(tmp_path), "beat")
    with run.lease(purpose="mine") as lease:
        path = tmp_path / "beat" / LEASE_FILE
        landed = {**lease.holder, "heartbeat": time.time()}
        path.write_text(json.dumps(landed))
        lease.renew()
        assert not lease.lost.is_set()
        assert json.loads(path.read_text())["token"] == lease.holder["token"]
        path.write_text(json.dumps({**landed, "token": "someone-else"}))
        lease.renew()
        assert lease.lost.is_set()


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from cliplung.runs import Run
    with Run(sys.argv[1], sys.argv[2]).lease(purpose="cliplung train held-by-test"):
        print("held", flush=True)
        time.sleep(120)
    """
)


def test_a_second_driver_is_refused_while_a_run_is_written(synthetic_store, tmp_path, capsys, forbid_ray):
    """Another process holds the run's lease: ``cliplung train`` with the same name and storage
    exits 2 naming the holder, before Ray starts and before anything of the run is written."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path / "runs"), "busy"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = cli.main(
            ["train", "--data", synthetic_store.path, "--storage", str(tmp_path / "runs"), "--name", "busy"]
        )
        err = capsys.readouterr().err
        assert rc == cli.EXIT_BAD_INPUT, err
        assert f"pid {holder.pid}" in err and "held-by-test" in err
        assert not (tmp_path / "runs" / "busy" / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- one override path


@pytest.mark.parametrize(
    ("argv", "field", "expected"),
    [
        (["--name", "42"], "name", "42"),
        (["--name", "yes"], "name", "yes"),
        (["--data", "runs/a #2"], "data.store", "runs/a #2"),
        (["--storage", "s3://bucket/a:b"], "storage.path", "s3://bucket/a:b"),
        (["--storage-endpoint", "http://127.0.0.1:9000"], "storage.endpoint", "http://127.0.0.1:9000"),
        (["--workers", "1", "--set", "train.workers=2"], "train.workers", 2),  # --set comes last
        (["--set", "model.n_ctx=8"], "model.n_ctx", 8),
    ],
)
def test_string_flags_stay_strings_and_set_is_yaml(argv, field, expected):
    from cliplung.arguments import config_from_args
    from cliplung.cli import TRAIN_FLAGS, build_parser

    args = build_parser().parse_args(["train", *argv])
    config = config_from_args(args, TRAIN_FLAGS)
    value = config.to_dict()
    for part in field.split("."):
        value = value[part]
    assert value == expected


@pytest.mark.parametrize("command", ["train", "tune", "cv"])
def test_every_command_reads_flags_the_same_way(command):
    from cliplung.arguments import config_from_args
    from cliplung.cli import TRAIN_FLAGS, build_parser
    from cliplung.evaluate.cli import CV_FLAGS
    from cliplung.tune.cli import tune_config

    argv = [command, "--name", "007", "--data", "d #1", "--storage", "s"]
    args = build_parser().parse_args(argv)
    if command == "tune":
        config = tune_config(args)
    else:
        config = config_from_args(args, TRAIN_FLAGS if command == "train" else CV_FLAGS)
    assert (config.name, config.data.store, config.storage.path) == ("007", "d #1", "s")


def test_bench_passes_its_flags_through(monkeypatch, capsys):
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs, args=args)
        return {}

    monkeypatch.setattr("cliplung.bench.predict.bench_predict", fake)
    assert cli.main(["bench", "predict", "--data", "x", "--json", "--batch", "3", "--steps", "2"]) == 0
    assert seen["data"] == "x" and seen["as_json"] is True and seen["batch"] == 3 and seen["steps"] == 2


@pytest.mark.parametrize(("what", "module", "function", "batch"), [
    ("model", "model", "bench_model", 8), ("ingest", "ingest", "bench_ingest", 32),
    ("predict", "predict", "bench_predict", 32),
])  # fmt: skip
def test_each_bench_keeps_its_own_batch_unless_one_is_given(monkeypatch, what, module, function, batch):
    """README's `cliplung bench ingest --json` is at batch 32; a CLI-wide default of 8 used to
    replace it (and predict's 32) silently."""
    import inspect

    target = f"cliplung.bench.{module}.{function}"
    seen = {}
    real = inspect.signature(getattr(importlib.import_module(f"cliplung.bench.{module}"), function))

    def fake(*args, **kwargs):
        seen.update(real.bind(*args, **kwargs).arguments)
        return {}

    monkeypatch.setattr(target, fake)
    assert cli.main(["bench", what, "--json"]) == 0
    assert seen.get("batch", real.parameters["batch"].default) == batch
    assert cli.main(["bench", what, "--json", "--batch", "5"]) == 0
    assert seen["batch"] == 5
