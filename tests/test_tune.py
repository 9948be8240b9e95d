"""``cliplung tune``: the search space and its checks, bad input that fails before Ray starts, and
(marked slow) real searches on an embedded Ray with a synthetic store: a search whose driver is
killed after two finished trials and then resumed, its study, summary and optuna-dashboard, and an
ASHA search that stops weak trials early."""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import json
import os
import re
import signal
import socket
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

from cliplung.config import ConfigError, dump_config, load_config
from cliplung.tune.cli import parse_resources, register, tune_config
from cliplung.tune.search import TRIAL_ID_ATTR, apply_params, search_space, tune_search

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
    assert not list((tmp_path / "runs").glob("*/experiment_state-*.json"))


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


# --------------------------------------------------------------------------- slow: real searches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tune_statuses(run_dir: Path) -> dict[str, str]:
    """Trial id -> status from Tune's saved experiment state (what a resume starts from)."""
    statuses: dict[str, str] = {}
    for path in sorted(run_dir.glob("experiment_state-*.json")):
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


@pytest.fixture(scope="module")
def interrupted_search(ray_cluster, store, tmp_path_factory):
    """A 4-trial x 2-epoch search (two trials at a time, ASHA off) whose driver, a separate process
    on the same Ray cluster, is SIGKILLed once Tune's saved state holds two finished trials (the
    next ones are running or pending by then); then resumed from this process."""
    runs = tmp_path_factory.mktemp("tune") / "runs"
    run_dir = runs / "search"
    argv = _tune_args(
        store.path, str(runs), "search", "--trials", "4", "--max-concurrent", "2",
        "--set", "tune.asha=false", "--address", ray_cluster,
    )  # fmt: skip
    log = (runs.parent / "driver.log").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER.format(tests=str(REPO / "tests")), *argv],
        cwd=runs.parent,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 420
    try:
        while time.monotonic() < deadline:
            finished = [t for t, s in _tune_statuses(run_dir).items() if s == "TERMINATED"]
            if len(finished) >= 2 or driver.poll() is not None:
                break
            time.sleep(0.5)
        assert driver.poll() is None, (
            f"driver ended early:\n{(runs.parent / 'driver.log').read_text()[-3000:]}"
        )
        assert len(finished) >= 2, "no two trials finished in time"
        before = {t: (run_dir / t / "result.json").read_bytes() for t in finished}
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()
    study_url = f"sqlite:///{run_dir}/optuna.db"
    told_before = {
        t.user_attrs[TRIAL_ID_ATTR]: t.value
        for t in optuna.load_study(study_name="search", storage=study_url).get_trials(
            states=(TrialState.COMPLETE,)
        )
    }
    config = config_from_args(_parser().parse_args(argv))
    summary = tune_search(config, resume=True, address=ray_cluster)
    return {
        "run_dir": run_dir,
        "study_url": study_url,
        "summary": summary,
        "finished_before_kill": before,
        "told_before_kill": told_before,
        "config": config,
    }


@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_trials(interrupted_search):
    s = interrupted_search
    rows = {r["trial_id"]: r for r in s["summary"].trials}
    assert len(rows) == 4, rows.keys()
    assert all(r["state"] == "COMPLETE" and r["epochs_done"] == 2 for r in rows.values()), rows
    for trial_id, result_log in s["finished_before_kill"].items():
        assert trial_id in rows
        # Tune appends one line per report: a re-run trial would have grown its log.
        assert (s["run_dir"] / trial_id / "result.json").read_bytes() == result_log
        last = json.loads(result_log.decode().strip().splitlines()[-1])
        assert rows[trial_id]["val/macro_f1"] == pytest.approx(last["val/macro_f1"])
        assert len(list((s["run_dir"] / "runs" / trial_id).glob("epoch_*"))) == 2
    for trial_id, value in s["told_before_kill"].items():
        assert rows[trial_id]["val/macro_f1"] == pytest.approx(value)


@pytest.mark.slow
def test_search_leaves_study_best_config_table_plots_and_tensorboard_logs(interrupted_search):
    s, summary = interrupted_search, interrupted_search["summary"]
    run_dir = s["run_dir"]
    study = optuna.load_study(study_name="search", storage=s["study_url"])
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4
    assert {t.user_attrs[TRIAL_ID_ATTR] for t in complete} == {r["trial_id"] for r in summary.trials}
    space = s["config"].tune.space
    for t in complete:
        assert set(t.params) == SEARCHED
        assert t.params["model.n_ctx"] in space.n_ctx
        assert space.lr[0] <= t.params["train.lr"] <= space.lr[1]
        assert space.lambda_ia[0] <= t.params["model.lambda_ia"] <= space.lambda_ia[1]
    assert len({t.params["train.lr"] for t in complete}) == 4

    table = _read_csv(run_dir / "trials.csv")
    assert len(table) == 4 and set(table[0]) >= SEARCHED and "val/macro_f1" in table[0]

    best = load_config(str(run_dir / "best.yaml"))
    assert best.name == "search-best" and best.model.n_ctx == study.best_trial.params["model.n_ctx"]
    assert best.train.lr == pytest.approx(study.best_trial.params["train.lr"])
    assert best.data.store == s["config"].data.store and best.train.epochs == 2
    # What `cliplung train --config best.yaml` parses: the same config, validated again.
    assert load_config(str(run_dir / "best.yaml"), ["train.epochs=2"]) == best
    assert summary.best["trial_id"] == study.best_trial.user_attrs[TRIAL_ID_ATTR]

    for name in ("optimization_history.png", "param_importances.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for trial_id in (r["trial_id"] for r in summary.trials):
        assert glob.glob(str(run_dir / trial_id / "events.out.tfevents.*")), (
            f"no TensorBoard log for {trial_id}"
        )


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_optuna_dashboard_serves_the_study(interrupted_search):
    exe = Path(sys.executable).with_name("optuna-dashboard")
    for _attempt in range(3):
        port = _free_port()
        dashboard = subprocess.Popen(
            [str(exe), interrupted_search["study_url"], "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
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
            (entry,) = [st for st in studies if st["study_name"] == "search"]
            detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{entry['study_id']}")
            complete = [t for t in detail["trials"] if t["state"] == "Complete"]
            assert len(complete) == 4
            assert {p["name"] for p in complete[0]["params"]} == SEARCHED
            return
        finally:
            dashboard.terminate()
            try:
                dashboard.wait(timeout=10)
            except subprocess.TimeoutExpired:
                dashboard.kill()
    pytest.fail("optuna-dashboard could not bind a free port in 3 attempts")


@pytest.fixture
def unrelated_ray():
    """A second Ray instance on this host, as another user's or another job's would be: its own
    temp dir, ports and token. Started with ``ray start --block`` and stopped by its pid."""
    import secrets
    import shutil
    import tempfile

    temp = tempfile.mkdtemp(prefix="/tmp/rayu-")  # short: Ray's unix socket paths must fit
    token = Path(temp) / "token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    port = _free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, "the unrelated Ray instance did not start"
            time.sleep(0.5)
        yield port
    finally:
        # Its processes share the process group `ray start` got: stop exactly those.
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


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
