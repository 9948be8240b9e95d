"""``cliplung tune``: the search space and its checks, bad input that fails before Ray starts, and
(marked slow) real searches with a synthetic store: four quarter-GPU trials at once on a Ray
cluster with one fake GPU, which is also a new user's first search (folders that do not exist
yet, the default SQLite study) followed by the same command again, and an ASHA search that stops
weak trials early. The search killed midway and resumed, with its study in PostgreSQL, is in
``test_tune_postgres.py``, which shares the machinery here (:func:`kill_driver_after`,
:func:`assert_resumed_without_rerunning`, :func:`dashboard_study`)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from probes import free_port, modules_imported_by
from rayenv import own_ray_env, ray_head

from cliplung.config import ConfigError, dump_config, load_config
from cliplung.tune.cli import parse_resources, register, tune_config
from cliplung.tune.search import TRIAL_ID_ATTR, TUNE_DIR, apply_params, search_space, tune_search

REPO = Path(__file__).resolve().parents[1]
SEARCHED = {
    "model.n_ctx",
    "model.lambda_ic",
    "model.lambda_ca",
    "model.lambda_ia",
    "train.lr",
    "train.weight_decay",
}

ALL_FIXED = [
    f"--set=tune.space.{field}={value}"
    for field, value in (
        ("n_ctx", "[4]"),
        ("lambda_ic", "[1, 1]"),
        ("lambda_ca", "[0.5, 0.5]"),
        ("lambda_ia", "[1, 1]"),
        ("lr", "[0.001, 0.001]"),
        ("weight_decay", "[0.0001, 0.0001]"),
    )
]


@pytest.fixture(scope="module")
def store(synthetic_store):
    return synthetic_store


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cliplung")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def _tune_args(store_path: str, storage: str, name: str, *extra: str) -> list[str]:
    return [
        "tune",
        "--data", store_path, "--storage", storage, "--name", name,
        "--resources-per-trial", "workers=1", "--epochs", "2",
        "--set", "metrics.enabled=false",
        *extra,
    ]  # fmt: skip


def own_lines(err: str) -> list[str]:
    """What this process printed on stderr, without the lines Ray's workers of the suite's cluster
    forward to it (``(RayTrainWorker pid=...) ...``, colour codes first)."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith(("(", "\x1b"))]


def _run_cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


# --------------------------------------------------------------------------- fast: no Ray


def test_search_space_follows_the_config():
    plan = search_space(load_config("debug"))
    assert set(plan.distributions) == SEARCHED and plan.fixed == {}
    n_ctx = plan.distributions["model.n_ctx"]
    assert isinstance(n_ctx, CategoricalDistribution) and n_ctx.choices == (1, 2, 4, 8, 16)
    for key in ("model.lambda_ic", "model.lambda_ca", "model.lambda_ia"):
        d = plan.distributions[key]
        assert isinstance(d, FloatDistribution) and not d.log and (d.low, d.high) == (0.0, 2.0)
    assert plan.distributions["train.lr"].log and plan.distributions["train.weight_decay"].log
    assert (plan.distributions["train.lr"].low, plan.distributions["train.lr"].high) == (1e-4, 1e-2)

    narrowed = search_space(load_config("debug", ["tune.space.lr=[0.001, 0.001]", "tune.space.n_ctx=[8, 8]"]))
    assert narrowed.fixed == {"model.n_ctx": 8, "train.lr": 0.001}
    assert set(narrowed.distributions) == SEARCHED - {"model.n_ctx", "train.lr"}


def test_searched_values_apply_as_a_valid_config_that_round_trips(tmp_path):
    cfg = apply_params(load_config("debug"), {"model.n_ctx": 8, "train.lr": 1e-5, "model.lambda_ca": 0.25})
    assert (cfg.model.n_ctx, cfg.train.lr, cfg.model.lambda_ca) == (8, 1e-5, 0.25)
    path = tmp_path / "best.yaml"
    dump_config(cfg, path)
    assert load_config(str(path)) == cfg  # 1e-05 comes back a float, not a string
    with pytest.raises(ConfigError, match=r"model\.n_ctx"):
        apply_params(load_config("debug"), {"model.n_ctx": 3})


def config_from_args(args):
    return tune_config(args)


def test_resources_per_trial_and_flags_become_config_fields():
    assert parse_resources("workers=1,gpus_per_worker=0.25") == [
        "train.workers=1",
        "train.gpus_per_worker=0.25",
    ]
    args = _parser().parse_args(
        [
            "tune", "--trials", "7", "--max-concurrent", "2", "--epochs", "3", "--name", "42",
            "--metric", "val/auc", "--mode", "max", "--study-db", "sqlite:////tmp/x: y.db",
            "--resources-per-trial", "workers=1,cpus_per_worker=1,gpus_per_worker=0.25",
        ]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.tune.trials, cfg.tune.max_concurrent, cfg.train.epochs) == (7, 2, 3)
    assert cfg.name == "42" and cfg.tune.metric == "val/auc" and cfg.tune.study_db == "sqlite:////tmp/x: y.db"
    assert (cfg.train.workers, cfg.train.cpus_per_worker, cfg.train.gpus_per_worker) == (1, 1, 0.25)
    for bad, message in (
        ("gpus=1", "unknown key 'gpus'"),
        ("workers", "KEY=VALUE"),
        ("workers=0", "train.workers"),
    ):
        with pytest.raises(ConfigError, match=message):
            config_from_args(_parser().parse_args(["tune", "--resources-per-trial", bad]))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--trials", "0"], "tune.trials: must be > 0, got 0"),
        (["--set", "tune.space.n_ctx=[]"], "tune.space.n_ctx: must list at least one"),
        (["--set", "tune.space.n_ctx=[3, 4]"], "do not divide model.feature_channels=16"),
        (["--set", "tune.space.lr=[0.01, 0.001]"], "tune.space.lr"),
        (ALL_FIXED, "the search space is empty"),
        (["--set", "model.method=ce"], "model.method='ce' has no prompts"),
        (["--set", "tune.grace_period=2"], "tune.grace_period"),
        (["--metric", "accuracy"], "tune.metric"),
        (["--study-db", "not a url"], "not a SQLAlchemy database URL"),
        (["--resume"], "nothing to resume"),
    ],
    ids=[
        "zero-trials",
        "empty-n_ctx",
        "n_ctx-not-dividing",
        "inverted-bounds",
        "nothing-varies",
        "ce-cannot-search-prompts",
        "grace-period-too-long",
        "unknown-metric",
        "bad-url",
        "resume-nothing",
    ],
)
def test_bad_input_fails_before_any_trial(store, tmp_path, extra, expected, forbid_ray):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        _run_cli(_tune_args(store.path, str(tmp_path / "runs"), "bad", *extra))
    assert not list((tmp_path / "runs").glob("*/tune/experiment_state-*.json"))


def test_unreachable_study_db_is_named_without_its_password(store, tmp_path, forbid_ray):
    missing = f"sqlite:///{tmp_path}/no/such/dir/optuna.db"
    with pytest.raises(ConfigError, match="cannot open the Optuna study database") as info:
        _run_cli(_tune_args(store.path, str(tmp_path / "runs"), "x", "--study-db", missing))
    assert missing in str(info.value)
    # No server listens on port 9 (and the driver may not even be installed): named, password hidden.
    url = "postgresql://tuner:s3cret@127.0.0.1:9/optuna"
    with pytest.raises(ConfigError, match="cannot open the Optuna study database") as info:
        _run_cli(_tune_args(store.path, str(tmp_path / "runs"), "x", "--study-db", url))
    assert "postgresql://tuner:***@127.0.0.1:9/optuna" in str(info.value) and "s3cret" not in str(info.value)


def test_s3_storage_needs_an_explicit_study_db(store, forbid_ray):
    with pytest.raises(ConfigError, match=re.escape("tune.study_db: storage s3://bucket/searches is on S3")):
        _run_cli(_tune_args(store.path, "s3://bucket/searches", "x"))


@pytest.mark.parametrize(
    "case",
    ["storage-is-a-file", "storage-under-a-file", "a-training-run", "bad-url", "s3-without-db",
     "unreachable-db", "password-file-missing", "bad-resources", "nothing-to-resume"],
)  # fmt: skip
def test_every_early_failure_is_one_line_and_exit_2(store, tmp_path, monkeypatch, capsys, forbid_ray, case):
    """What a user can get wrong before any trial: one line on stderr naming the problem, exit 2,
    no traceback, and nothing written where the user pointed."""
    from cliplung.cli import main

    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    storage, extra, expected = str(tmp_path / "runs"), [], None
    if case == "storage-is-a-file":
        storage, expected = str(afile), "cannot create the search directory"
    elif case == "storage-under-a-file":
        storage, expected = str(afile / "sub"), "cannot create the search directory"
    elif case == "a-training-run":
        (tmp_path / "runs" / "x").mkdir(parents=True)
        (tmp_path / "runs" / "x" / "run.json").write_text('{"kind": "train", "config": {}}\n')
        expected = "is a train run, not a search"
    elif case == "bad-url":
        extra, expected = ["--study-db", "postgresql+psycopg://u:pw@h:notaport/db"], "not a SQLAlchemy"
    elif case == "s3-without-db":
        storage, expected = "s3://bucket/searches", "OPTUNA_STORAGE"
        monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    elif case == "unreachable-db":
        extra, expected = ["--study-db", "postgresql+psycopg://u@127.0.0.1:9/db"], "127.0.0.1"
    elif case == "password-file-missing":
        monkeypatch.setenv("CLIPLUNG_STUDY_DB_PASSWORD_FILE", str(tmp_path / "nope"))
        extra = ["--study-db", "postgresql+psycopg://u@127.0.0.1:9/db"]
        expected = (
            f"CLIPLUNG_STUDY_DB_PASSWORD_FILE: cannot read the study database password from {tmp_path}/nope"
        )
    elif case == "bad-resources":
        extra, expected = ["--resources-per-trial", "gpus=1"], "unknown key 'gpus'"
    elif case == "nothing-to-resume":
        extra, expected = ["--resume"], "nothing to resume"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(_tune_args(store.path, storage, "x", *extra)) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("cliplung tune: error: "), err
    assert expected in err[0] and "Traceback" not in err[0] and ":pw@" not in err[0]
    assert afile.read_text() == "keep me\n"
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before or case == "unreachable-db"  # the empty search folder the study needs


def test_study_db_comes_from_the_flag_or_optuna_storage_and_its_password_from_a_file(tmp_path, monkeypatch):
    """Whatever the source, the search records the URL without its password (``public``); only
    the in-memory ``url`` has it. A relative SQLite path is made absolute."""
    from cliplung.tune.study import PASSWORD_FILE_ENV, STORAGE_ENV, StudySearcher, connect_url, study_db

    monkeypatch.delenv(STORAGE_ENV, raising=False)
    monkeypatch.delenv(PASSWORD_FILE_ENV, raising=False)
    base = load_config("debug", [f"storage.path={tmp_path}/runs", "name=s"])
    assert study_db(base).public == f"sqlite:///{tmp_path}/runs/s/optuna.db" and study_db(base).is_default
    monkeypatch.chdir(tmp_path)
    assert (
        study_db(load_config("debug", ["tune.study_db=sqlite:///rel.db"])).url
        == f"sqlite:///{tmp_path}/rel.db"
    )

    in_flag = study_db(load_config("debug", ["tune.study_db=postgresql+psycopg://u:fl%40g@db:5432/o"]))
    assert (in_flag.url, in_flag.public, in_flag.source) == (
        "postgresql+psycopg://u:fl%40g@db:5432/o", "postgresql+psycopg://u@db:5432/o", "tune.study_db",
    )  # fmt: skip
    assert "fl%40g" not in repr(in_flag)
    monkeypatch.setenv(STORAGE_ENV, "postgresql+psycopg://u@db:5432/o")
    (tmp_path / "pw").write_text("from-file\n")
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(tmp_path / "pw"))
    from_env = study_db(base)
    assert from_env.source == STORAGE_ENV and from_env.url == "postgresql+psycopg://u:from-file@db:5432/o"
    assert from_env.public == in_flag.public  # the same search, whichever way the password came
    # The searcher Tune pickles holds the public URL; this driver finds the password again.
    searcher = StudySearcher(
        {}, metric="val/macro_f1", mode="max", study_name="s", study_url=from_env.url, seed=0, max_epochs=1
    )
    import pickle

    restored = pickle.loads(pickle.dumps(searcher))
    assert restored.study_url == from_env.public and b"from-file" not in pickle.dumps(searcher)
    assert connect_url(restored.study_url) == from_env.url


def test_a_password_on_the_command_line_gets_a_note(store, tmp_path, capsys, forbid_ray):
    from cliplung.cli import main

    url = "postgresql+psycopg://u:hunter2@127.0.0.1:9/db"
    assert main(_tune_args(store.path, str(tmp_path / "runs"), "x", "--study-db", url)) == 2
    err = capsys.readouterr().err
    assert "password is visible to `ps`" in err and "hunter2" not in err


def test_searcher_tags_trials_steps_by_epoch_and_prunes_early_stops(tmp_path):
    import pickle

    from cliplung.tune.study import EPOCHS_DONE, StudySearcher

    plan = search_space(load_config("debug"))
    searcher = StudySearcher(
        plan.distributions,
        metric="val/macro_f1",
        mode="max",
        seed=0,
        study_name="s",
        study_url=f"sqlite:///{tmp_path}/study.db",
        max_epochs=3,
    )
    for ray_id in ("full", "stopped", "broken"):
        params = searcher.suggest(ray_id)
        assert set(params) == SEARCHED
    searcher.on_trial_result("full", {"val/macro_f1": 0.2, EPOCHS_DONE: 1})
    # Tune pickles the searcher and restores its saved state after a driver dies: a fresh copy
    # goes on recording the same trials.
    searcher.save(str(tmp_path / "searcher.json"))
    searcher = pickle.loads(pickle.dumps(searcher))
    searcher.restore(str(tmp_path / "searcher.json"))
    searcher.on_trial_result("full", {"val/macro_f1": 0.4, EPOCHS_DONE: 2})
    searcher.on_trial_complete("full", {"val/macro_f1": 0.5, EPOCHS_DONE: 3})
    searcher.on_trial_complete("stopped", {"val/macro_f1": 0.1, EPOCHS_DONE: 1})  # ASHA's stop
    searcher.on_trial_complete("broken", None, error=True)
    trials = {t.user_attrs[TRIAL_ID_ATTR]: t for t in searcher.study.get_trials()}
    assert trials["full"].state == TrialState.COMPLETE and trials["full"].value == 0.5
    assert trials["full"].intermediate_values == {1: 0.2, 2: 0.4, 3: 0.5}
    assert trials["stopped"].state == TrialState.PRUNED and trials["stopped"].intermediate_values == {1: 0.1}
    assert trials["broken"].state == TrialState.FAIL


def test_a_resumed_searcher_does_not_draw_the_configurations_again(tmp_path):
    """A driver killed and started again reopens the study with the same seed; its sampler must
    not start the seeded sequence over, or the resumed search trains the first configurations a
    second time (found when a killed PostgreSQL search ended with two equal learning rates)."""
    import pickle

    from cliplung.tune.study import EPOCHS_DONE, StudySearcher

    def searcher():
        plan = search_space(load_config("debug"))
        return StudySearcher(
            plan.distributions, metric="val/macro_f1", mode="max", seed=0, study_name="s",
            study_url=f"sqlite:///{tmp_path}/study.db", max_epochs=1,
        )  # fmt: skip

    first = searcher()
    drawn = [first.suggest(f"t{i}") for i in range(3)]
    for i in range(3):
        first.on_trial_complete(f"t{i}", {"val/macro_f1": 0.1 * i, EPOCHS_DONE: 1})
    resumed = pickle.loads(pickle.dumps(first))  # what Tune restores after the driver died
    again = [resumed.suggest(f"r{i}") for i in range(3)]
    fresh = searcher()  # a new driver process: a new searcher on the same study
    again += [fresh.suggest(f"f{i}") for i in range(3)]
    lrs = [d["train.lr"] for d in drawn + again]
    assert len(set(lrs)) == len(lrs), lrs
    # A new search with the same seed still draws the same first configurations.
    other = StudySearcher(
        search_space(load_config("debug")).distributions, metric="val/macro_f1", mode="max", seed=0,
        study_name="other", study_url=f"sqlite:///{tmp_path}/study.db", max_epochs=1,
    )  # fmt: skip
    assert other.suggest("o0") == drawn[0]


def test_study_is_reconciled_with_tune_when_the_search_ends():
    """A trial that failed and then succeeded on resume gets a completed copy; one whose result
    never reached the searcher is told; one asked by a dead driver (no Tune trial) is closed."""
    from types import SimpleNamespace

    from cliplung.tune.study import EPOCHS_DONE
    from cliplung.tune.study import reconcile_study as _reconcile_study

    study = optuna.create_study(direction="maximize")
    space = {"train.lr": FloatDistribution(1e-4, 1e-2, log=True)}
    trials = [study.ask(space) for _ in range(4)]
    for trial, ray_id in zip(trials, ("failed", "untold", "orphan", "pruned"), strict=True):
        trial.set_user_attr(TRIAL_ID_ATTR, ray_id)
        trial.report(0.25, 1)
    study.tell(trials[0], state=TrialState.FAIL)

    def result(ray_id, epochs, value):
        metrics = {"val/macro_f1": value, EPOCHS_DONE: epochs}
        return SimpleNamespace(path=f"/runs/search/{ray_id}", metrics=metrics, error=None)

    results = [result("failed", 3, 0.5), result("untold", 3, 0.75), result("pruned", 1, 0.25)]
    notes = _reconcile_study(study, results, "val/macro_f1", max_epochs=3)
    by_number = {t.number: t for t in study.get_trials()}
    assert by_number[0].state == TrialState.FAIL  # history kept
    copy = by_number[4]
    assert copy.state == TrialState.COMPLETE and copy.value == 0.5 and copy.params == trials[0].params
    assert copy.user_attrs[TRIAL_ID_ATTR] == "failed" and copy.user_attrs["rerun_of_optuna_trial"] == 0
    assert by_number[1].state == TrialState.COMPLETE and by_number[1].value == 0.75
    assert by_number[2].state == TrialState.FAIL
    assert by_number[3].state == TrialState.PRUNED
    assert any("succeeded on resume" in n for n in notes) and any("closed 1 Optuna trial" in n for n in notes)


@pytest.mark.parametrize("module", ["cliplung.tune.search", "cliplung.train.trainer"])
def test_a_process_that_only_drives_training_loads_no_model(module):
    """A Tune trial's actor (and a driver) imports the trial function's module and builds a
    TorchTrainer; only the Train workers need the model. Both modules pulled in the model, its
    open_clip text tower and torchvision (about 2 s of CPU per trial actor on these cores)."""
    loaded = modules_imported_by(f"import {module}")
    heavy = {"open_clip", "torchvision", "deepspeed", "cliplung.model.cliplung", "cliplung.train.loop"}
    assert not loaded & heavy, sorted(loaded & heavy)


# --------------------------------------------------------------------------- slow: real searches


def _tune_statuses(run_dir: Path) -> dict[str, str]:
    """Trial id -> status from Tune's saved experiment state (what a resume starts from)."""
    statuses: dict[str, str] = {}
    for path in sorted((run_dir / TUNE_DIR).glob("experiment_state-*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):  # being rewritten
            continue
        for trial_json, _ in state["trial_data"]:
            trial = json.loads(trial_json)
            statuses[trial["trial_id"]] = trial["status"]
    return statuses


def _read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    return ray_session


_DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from test_tune import _run_cli
sys.exit(_run_cli(sys.argv[1:]))
"""


def kill_driver_after(argv: list[str], run_dir: Path, finished: int, *, env: dict | None = None) -> dict:
    """Run ``cliplung tune argv`` as a separate driver process (on the cluster its ``--address``
    names) and SIGKILL it once Tune's saved state holds ``finished`` finished trials whose
    ``result.json`` in the search directory has their last epoch (the next trials are running or
    pending by then). Returns each finished trial's ``result.json`` bytes."""
    log_path = run_dir.parent.parent / f"driver-{run_dir.name}.log"
    log = log_path.open("w")
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER.format(tests=str(REPO / "tests")), *argv],
        cwd=run_dir.parent.parent,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    epochs = int(argv[argv.index("--epochs") + 1])

    def reported_all(trial_id: str) -> bool:
        # Tune syncs a trial's result.json to the search directory after the state says TERMINATED.
        try:
            last = (run_dir / TUNE_DIR / trial_id / "result.json").read_text().strip().splitlines()[-1]
            return json.loads(last).get("epochs_done", 0) >= epochs
        except (OSError, IndexError, ValueError):
            return False

    deadline = time.monotonic() + 420
    try:
        while time.monotonic() < deadline:
            done = [t for t, s in _tune_statuses(run_dir).items() if s == "TERMINATED" and reported_all(t)]
            if len(done) >= finished or driver.poll() is not None:
                break
            time.sleep(0.5)
        assert driver.poll() is None, f"driver ended early:\n{log_path.read_text()[-3000:]}"
        assert len(done) >= finished, f"no {finished} trials finished in time"
        return {t: (run_dir / TUNE_DIR / t / "result.json").read_bytes() for t in done}
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()


def assert_resumed_without_rerunning(summary, run_dir: Path, before: dict, told: dict, trials: int) -> None:
    """A resumed search ends with ``trials`` complete trials; the ones finished before the kill
    kept their logs (Tune appends one line per report: a re-run would grow it), checkpoints and
    the values Optuna was told."""
    rows = {r["trial_id"]: r for r in summary.trials}
    assert len(rows) == trials, rows.keys()
    assert all(r["state"] == "COMPLETE" and r["epochs_done"] == 2 for r in rows.values()), rows
    for trial_id, result_log in before.items():
        assert trial_id in rows
        assert (run_dir / TUNE_DIR / trial_id / "result.json").read_bytes() == result_log
        last = json.loads(result_log.decode().strip().splitlines()[-1])
        assert rows[trial_id]["val/macro_f1"] == pytest.approx(last["val/macro_f1"])
        assert len(list((run_dir / "runs" / trial_id).glob("epoch_*"))) == 2
    for trial_id, value in told.items():
        assert rows[trial_id]["val/macro_f1"] == pytest.approx(value)


def dashboard_study(study_url: str, name: str, env: dict | None = None) -> dict:
    """Start ``optuna-dashboard`` on ``study_url`` and return its JSON view of study ``name``
    (``/api/studies/<id>``); stopped by pid."""
    exe = Path(sys.executable).with_name("optuna-dashboard")
    for _attempt in range(3):
        port = free_port()
        dashboard = subprocess.Popen(
            [str(exe), study_url, "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        try:
            studies = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and dashboard.poll() is None:
                try:
                    studies = _get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
                    break
                except (urllib.error.URLError, ConnectionError):
                    time.sleep(0.3)
            if studies is None and dashboard.poll() is not None:
                continue  # lost the port to someone else: try another one
            assert studies is not None, "optuna-dashboard did not answer"
            (entry,) = [st for st in studies if st["study_name"] == name]
            return _get_json(f"http://127.0.0.1:{port}/api/studies/{entry['study_id']}")
        finally:
            dashboard.terminate()
            try:
                dashboard.wait(timeout=10)
            except subprocess.TimeoutExpired:
                dashboard.kill()
    pytest.fail("optuna-dashboard could not bind a free port in 3 attempts")


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


FAKE_GPU_SITECUSTOMIZE = """
# Test-only, for Ray processes on a cluster whose GPUs are fake (--num-gpus on a host without CUDA):
# a Train worker that holds a GPU share joins a gloo process group instead of nccl and trains on
# the CPU. Ray's resource accounting and placement, and everything cliplung does, stay as they are.

import importlib.abc
import importlib.util
import sys


def _torch_config(module):
    real = module._setup_torch_process_group

    def _setup_torch_process_group(backend, *args, **kwargs):
        return real("gloo", *args, **kwargs)

    _setup_torch_process_group.__module__ = module.__name__
    module._setup_torch_process_group = _setup_torch_process_group


def _cuda_devices(module):
    import torch

    cls = module.CUDATorchDeviceManager
    real = cls.get_devices

    def get_devices(self):
        return real(self) if torch.cuda.is_available() else [torch.device("cpu")]

    cls.get_devices = get_devices


_PATCHES = {
    "ray.train.torch.config": _torch_config,
    "ray.air._internal.device_manager.nvidia_gpu": _cuda_devices,
}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in _PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            _PATCHES[name](module)

        spec.loader.exec_module = patched
        return spec


sys.meta_path.insert(0, _Finder())
"""
"""Put on the fake-GPU cluster's PYTHONPATH as ``sitecustomize.py``: the only thing this test
substitutes, because the GPUs it counts do not exist (no CUDA on this machine, none lent)."""

_GPU_DRIVER = """
import json, sys, threading, time
sys.path.insert(0, {tests!r})
import ray
from test_tune import _run_cli
low = []
def watch():
    while True:
        if ray.is_initialized():
            try:
                low.append(ray.available_resources().get("GPU", 0.0))
            except Exception:
                pass
        time.sleep(0.25)
threading.Thread(target=watch, daemon=True).start()
code = _run_cli(sys.argv[2:])
json.dump({{"least_free_gpu": min(low) if low else None}}, open(sys.argv[1], "w"))
sys.exit(code)
"""


@pytest.fixture
def fake_gpu_cluster():
    """A Ray head with 5 CPUs and one fake GPU (tests/rayenv.py: ray_head). Yields (address,
    environment for its drivers)."""
    env = own_ray_env() | {"PYTHONPATH": str(REPO)}
    with ray_head("/tmp/rayg-", "--num-cpus=5", "--num-gpus=1", env=env, hook=FAKE_GPU_SITECUSTOMIZE) as head:
        yield head


@pytest.mark.slow
def test_quarter_gpu_trials_run_four_at_once_on_one_gpu(fake_gpu_cluster, store, tmp_path):
    """``--resources-per-trial workers=1,gpus_per_worker=0.25``: four trials' Train workers hold a
    quarter of the one GPU each, all at the same time. The cluster's GPU is fake (Ray counts it;
    there is no CUDA), so the workers train on the CPU over gloo (see FAKE_GPU_SITECUSTOMIZE);
    the search, Tune, the trials' placement and Ray's accounting are the real ones."""
    address, env = fake_gpu_cluster
    runs = tmp_path / "new" / "deeper" / "runs"  # what a new user types: nothing exists yet
    argv = _tune_args(
        store.path, str(runs), "gpu", "--trials", "4", "--max-concurrent", "4", "--epochs", "1",
        "--resources-per-trial", "workers=1,gpus_per_worker=0.25", "--set", "tune.asha=false",
        "--address", address,
    )  # fmt: skip
    watch = tmp_path / "watch.json"

    def run_driver() -> None:
        driver = subprocess.run(
            [sys.executable, "-c", _GPU_DRIVER.format(tests=str(REPO / "tests")), str(watch), *argv],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]

    run_driver()
    run_dir = runs / "gpu"
    rows = _read_csv(run_dir / "trials.csv")
    assert [r["state"] for r in rows] == ["COMPLETE"] * 4
    logs = {r["trial_id"]: (run_dir / TUNE_DIR / r["trial_id"] / "result.json").read_bytes() for r in rows}
    spans = []
    for text in logs.values():
        last = json.loads(text.decode().splitlines()[-1])
        spans.append((last["timestamp"] - last["time_total_s"], last["timestamp"]))
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans  # all four ran at once
    assert json.loads(watch.read_text())["least_free_gpu"] == pytest.approx(0.0)  # 4 x 0.25 held
    assert (run_dir / "optuna.db").exists() and not (run_dir / "lease.json").exists()
    # A retry of the same command continues the search: tests/test_tune_postgres.py kills one midway.


@pytest.fixture
def unrelated_ray():
    """A second Ray instance on this host, as another user's or another job's would be: its own
    temp dir, ports and token (tests/rayenv.py: ray_head). Yields its GCS port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    with ray_head("/tmp/rayu-", "--num-cpus=1", "--include-dashboard=false", env=env) as (address, _):
        yield int(address.rsplit(":", 1)[1])


@pytest.mark.slow
def test_asha_stops_weak_trials_early(ray_cluster, store, tmp_path, unrelated_ray):
    """Built to show ASHA, with a second, unrelated Ray instance running on the host (which used
    to keep Ray Train's clean-up from finding this cluster, so stopped trials kept their CPUs): 4 trials one after another, 3 epochs each, rungs after epoch 1
    (grace_period 1) and 2, halving rate 2; the training cross-entropy (min) as the metric because
    it never ties, where the tiny validation split often gives equal macro-F1. The first trial
    always runs to the end; a later one is stopped at a rung when it is behind the median of the
    trials that reached it. Seeded (TPE, training), so the same trials stop every run."""
    config = load_config(
        "debug",
        [
            f"data.store={store.path}", f"storage.path={tmp_path / 'runs'}", "name=asha",
            "metrics.enabled=false", "train.workers=1", "train.epochs=3",
            "tune.trials=4", "tune.max_concurrent=1", "tune.asha=true", "tune.grace_period=1",
            "tune.reduction_factor=2", "tune.metric=train/ce", "tune.mode=min",
        ],
    )  # fmt: skip
    import ray
    from ray.util import placement_group_table

    before = set(placement_group_table())
    summary = tune_search(config, address=ray_cluster)
    rows = summary.trials
    assert len(rows) == 4  # every trial got its CPUs, also after the early stops
    stopped = [r for r in rows if r["epochs_done"] < 3]
    assert stopped, [(r["trial_id"], r["epochs_done"]) for r in rows]
    assert all(r["state"] == "PRUNED" for r in stopped)
    assert any(r["state"] == "COMPLETE" and r["epochs_done"] == 3 for r in rows)
    assert all(r["best_train/ce"] <= r["train/ce"] for r in rows)  # every epoch reached Optuna
    assert summary.best is not None
    best_row = next(r for r in rows if r["trial_id"] == summary.best["trial_id"])
    assert best_row["state"] == "COMPLETE"  # the best configuration was trained to the end
    # Ray's own clean-up freed every placement group the search created, stopped trials included.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = {
            k: v for k, v in placement_group_table().items() if k not in before and v["state"] != "REMOVED"
        }
        if not left:
            break
        time.sleep(1)
    assert not left, left
    assert ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU")
