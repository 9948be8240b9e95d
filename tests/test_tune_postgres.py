"""Searches whose Optuna study lives in a real PostgreSQL (``pg_server``, tests/pgserver.py).

The main fixture is the search a RayJob runs: URL from ``OPTUNA_STORAGE``, password from a file
(``CLIPLUNG_STUDY_DB_PASSWORD_FILE``), 3 trials x 2 epochs two at a time; its driver is killed
after two finished trials and the same command is run again, as a RayJob retry would. A second,
differently named search shares the database with the password inside its config. Then: nothing
either wrote holds the password; neither touched the other's study; the dashboard serves it; a
changed config is refused naming the difference; a wrong password fails before any trial.
"""

from __future__ import annotations

import glob
import json
import threading
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_tune import (
    SEARCHED,
    _parser,
    _read_csv,
    _tune_args,
    assert_resumed_without_rerunning,
    dashboard_study,
    kill_driver_after,
    own_lines,
)

from cliplung.config import load_config
from cliplung.tune.cli import tune_config
from cliplung.tune.search import TRIAL_ID_ATTR, TUNE_DIR, tune_search
from cliplung.tune.study import PASSWORD_FILE_ENV, STORAGE_ENV, open_study_storage

pytestmark = pytest.mark.slow  # a PostgreSQL server (and most tests a Ray cluster)

DATABASE = "studies"
TRIALS = 3  # the main search's trials; its driver is killed after 2 of them finished


def error_line(err: str) -> str:
    """The one line ``cliplung tune`` printed on stderr (Ray's workers of the suite's cluster may
    print theirs there too)."""
    informational = ("cliplung tune: note:", "taking over the lease of")
    (line,) = [line for line in own_lines(err) if not line.startswith(informational)]
    assert line.startswith("cliplung tune: error:"), line
    return line


def _snapshot(url: str, name: str) -> list[tuple]:
    study = optuna.load_study(study_name=name, storage=url)
    return [
        (t.number, t.state, t.value, dict(t.intermediate_values), dict(t.params), dict(t.user_attrs))
        for t in study.get_trials()
    ]


@pytest.fixture(scope="module")
def pg(pg_server):
    pg_server.create_database(DATABASE)
    return pg_server


@pytest.fixture(scope="module")
def pg_search(ray_session, synthetic_store, pg, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-pg")
    password_file = tmp_path_factory.mktemp("secret") / "study-db-password"
    password_file.write_text(pg.password + "\n")
    env = {STORAGE_ENV: pg.url(DATABASE, password=False), PASSWORD_FILE_ENV: str(password_file)}
    runs = root / "runs"
    run_dir = runs / "search"
    argv = _tune_args(
        synthetic_store.path, str(runs), "search", "--trials", str(TRIALS), "--max-concurrent", "2",
        "--set", "tune.asha=false", "--address", ray_session,
    )  # fmt: skip
    before = kill_driver_after(argv, run_dir, 2, env=env)
    told = {
        t.user_attrs[TRIAL_ID_ATTR]: t.value
        for t in optuna.load_study(study_name="search", storage=pg.url(DATABASE)).get_trials(
            states=(TrialState.COMPLETE,)
        )
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        # The same command again, without --resume: what a RayJob's retry runs.
        config = tune_config(_parser().parse_args(argv))
        summary = tune_search(config, address=ray_session)
    return {
        "root": root,
        "argv": argv,
        "env": env,
        "run_dir": run_dir,
        "summary": summary,
        "before": before,
        "told": told,
        "config": config,
    }


@pytest.fixture(scope="module")
def other_search(pg_search, ray_session, synthetic_store, pg):
    """Another search in the same database, named differently, its password in its config. Its one
    trial's worker exits at step 5 (epoch 2 of 2, 3 steps an epoch), once."""
    study_url = pg.url(DATABASE)
    search_before = _snapshot(study_url, "search")
    config = load_config(
        "debug",
        [
            f"data.store={synthetic_store.path}", f"storage.path={pg_search['root'] / 'runs'}",
            "name=other", "metrics.enabled=false", "train.workers=1", "train.epochs=2",
            "train.debug_fail_at_step=5", "tune.trials=1", "tune.asha=false", f"tune.study_db={study_url}",
        ],
    )  # fmt: skip
    summary = tune_search(config, address=ray_session)
    return {
        "summary": summary,
        "search_before": search_before,
        "run_dir": pg_search["root"] / "runs" / "other",
    }


def test_killed_search_resumes_without_rerunning_finished_trials(pg_search):
    s = pg_search
    assert_resumed_without_rerunning(s["summary"], s["run_dir"], s["before"], s["told"], trials=TRIALS)
    assert not (s["run_dir"] / "lease.json").exists(), "the finished search kept its lease"
    assert s["summary"].study_db == s["env"][STORAGE_ENV]


def test_search_leaves_study_best_config_table_plots_and_tensorboard_logs(pg_search, pg):
    s, summary = pg_search, pg_search["summary"]
    run_dir = s["run_dir"]
    study = optuna.load_study(study_name="search", storage=pg.url(DATABASE))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == TRIALS
    assert {t.user_attrs[TRIAL_ID_ATTR] for t in complete} == {r["trial_id"] for r in summary.trials}
    space = s["config"].tune.space
    for t in complete:
        assert set(t.params) == SEARCHED
        assert t.params["model.n_ctx"] in space.n_ctx
        assert space.lr[0] <= t.params["train.lr"] <= space.lr[1]
    assert len({t.params["train.lr"] for t in complete}) == TRIALS

    table = _read_csv(run_dir / "trials.csv")
    assert len(table) == TRIALS and set(table[0]) >= SEARCHED and "val/macro_f1" in table[0]
    best = load_config(str(run_dir / "best.yaml"))
    assert best.name == "search-best" and best.model.n_ctx == study.best_trial.params["model.n_ctx"]
    assert best.train.lr == pytest.approx(study.best_trial.params["train.lr"])
    assert best.data.store == s["config"].data.store and best.train.epochs == 2
    assert load_config(str(run_dir / "best.yaml"), ["train.epochs=2"]) == best
    assert summary.best["trial_id"] == study.best_trial.user_attrs[TRIAL_ID_ATTR]
    for name in ("optimization_history.png", "param_importances.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for trial_id in (r["trial_id"] for r in summary.trials):
        assert glob.glob(str(run_dir / TUNE_DIR / trial_id / "events.out.tfevents.*")), trial_id


def test_optuna_dashboard_serves_the_study(pg_search, pg):
    # The way the cluster's Deployment runs it: the URL without the password, libpq's PGPASSWORD.
    detail = dashboard_study(pg.url(DATABASE, password=False), "search", env={"PGPASSWORD": pg.password})
    complete = [t for t in detail["trials"] if t["state"] == "Complete"]
    assert len(complete) == TRIALS
    assert {p["name"] for p in complete[0]["params"]} == SEARCHED


def test_searches_with_different_names_never_share_or_delete_each_others_study(
    pg_search, other_search, pg, synthetic_store, tmp_path, capsys, forbid_ray
):
    url = pg.url(DATABASE)
    assert _snapshot(url, "search") == other_search["search_before"]
    (trial,) = optuna.load_study(study_name="other", storage=url).get_trials()
    assert trial.state == TrialState.COMPLETE
    assert {r["trial_id"] for r in other_search["summary"].trials} == {trial.user_attrs[TRIAL_ID_ATTR]}
    # The same name from another storage would feed the same study: refused, nothing touched.
    from cliplung.cli import main

    argv = _tune_args(synthetic_store.path, str(tmp_path / "elsewhere"), "search", "--study-db", url)
    assert main(argv) == 2
    err = error_line(capsys.readouterr().err)
    assert "already holds a study 'search'" in err and str(pg_search["run_dir"]) in err, err
    assert pg.password not in err
    assert _snapshot(url, "search") == other_search["search_before"]


def test_a_worker_failure_in_a_trial_is_retried_by_the_trial_from_its_last_checkpoint(other_search, pg):
    """The trial retries a failed Train run itself (a new run resuming the trial's checkpoints);
    Ray Train retries nothing inside a trial, because a Ray Train retry that races Tune stopping
    the trial leaves a placement group nobody removes (cliplung/tune/search.py: _trial)."""
    (row,) = other_search["summary"].trials
    assert row["state"] == "COMPLETE" and row["epochs_done"] == 2
    (trial,) = optuna.load_study(study_name="other", storage=pg.url(DATABASE)).get_trials()
    assert sorted(trial.intermediate_values) == [1, 2]  # epoch 1 before the failure, 2 after it
    run_dir = other_search["run_dir"] / "runs" / row["trial_id"]
    assert sorted(p.name for p in run_dir.glob("epoch_*")) == ["epoch_0000", "epoch_0001"]
    recorded = json.loads((run_dir / "run.json").read_text())["config"]["train"]
    assert recorded["max_failures"] == 0 and recorded["debug_fail_at_step"] == 5


def test_a_changed_config_is_refused_naming_the_difference(pg_search, pg, capsys, monkeypatch, forbid_ray):
    from cliplung.cli import main

    for key, value in pg_search["env"].items():
        monkeypatch.setenv(key, value)
    run_json = (pg_search["run_dir"] / "run.json").read_bytes()
    trials = _snapshot(pg.url(DATABASE), "search")
    for extra, difference in (
        (["--epochs", "3"], "train.epochs: was 2, now 3"),
        (["--set", "tune.space.n_ctx=[2, 4]"], "tune.space.n_ctx: was [1, 2, 4, 8, 16], now [2, 4]"),
    ):
        assert main([*pg_search["argv"], *extra]) == 2
        line = error_line(capsys.readouterr().err)
        assert difference in line, line
    assert (pg_search["run_dir"] / "run.json").read_bytes() == run_json
    assert _snapshot(pg.url(DATABASE), "search") == trials


def _files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_no_file_a_search_wrote_holds_the_password(pg_search, other_search, pg):
    """Everything both searches wrote (configs, run records, checkpoints, model.pt, best.yaml,
    Tune's tuner.pkl and searcher state, logs, the driver's output) and Ray's session logs."""
    import ray

    secret = pg.password.encode()
    files = _files_under(pg_search["root"])
    names = {p.name for p in files}
    assert {"tuner.pkl", "best.yaml", "config.yaml", "model.pt", "run.json"} <= names, names
    assert any(n.startswith("searcher-state") for n in names), names
    session = Path(ray._private.worker._global_node.get_session_dir_path())  # test-only internal
    files += [p for p in _files_under(session / "logs") if p.stat().st_size < 200 * 2**20]
    leaked = [str(p) for p in files if secret in p.read_bytes()]
    assert not leaked, leaked
    # What they recorded instead: the URL without it.
    text = (pg_search["run_dir"] / "config.yaml").read_text()
    assert f"study_db: {pg.url(DATABASE, password=False)}" in text
    assert (
        f"study_db: {pg.url(DATABASE, password=False)}" in (other_search["run_dir"] / "best.yaml").read_text()
    )


def test_two_trials_reporting_at_once_lose_nothing(pg):
    url = pg.create_database("concurrent")
    study = optuna.create_study(study_name="c", storage=open_study_storage(url), direction="maximize")
    steps, barrier, errors = 40, threading.Barrier(2), []

    def trial_worker(k: int) -> None:
        try:
            own = optuna.load_study(study_name="c", storage=open_study_storage(url))  # own connections
            trial = own.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
            trial.set_user_attr("worker", k)
            barrier.wait()
            for step in range(steps):
                trial.report(k + step / steps, step)
            own.tell(trial, k + 1.0)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=trial_worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    trials = sorted(study.get_trials(), key=lambda t: t.user_attrs["worker"])
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 and [t.value for t in trials] == [1.0, 2.0]
    for k, t in enumerate(trials):
        assert t.intermediate_values == {s: pytest.approx(k + s / steps) for s in range(steps)}


@pytest.mark.parametrize("how", ["in-the-url", "from-the-password-file"])
def test_a_wrong_password_fails_before_any_trial_naming_the_host_not_the_password(
    pg, synthetic_store, tmp_path, monkeypatch, capsys, forbid_ray, how
):
    from cliplung.cli import main

    wrong = "not-the-password-5ec7"
    if how == "in-the-url":
        extra = ["--study-db", pg.url(DATABASE).replace(pg.password, wrong)]
    else:
        (tmp_path / "pw").write_text(wrong)
        monkeypatch.setenv(PASSWORD_FILE_ENV, str(tmp_path / "pw"))
        monkeypatch.setenv(STORAGE_ENV, pg.url(DATABASE, password=False))
        extra = []
    assert main(_tune_args(synthetic_store.path, str(tmp_path / "runs"), "x", *extra)) == 2
    out = capsys.readouterr()
    line = error_line(out.err)
    assert line.startswith("cliplung tune: error: tune.study_db: cannot open the Optuna study database")
    assert f"@127.0.0.1:{pg.port}/{DATABASE}" in line and "password authentication failed" in line, line
    assert wrong not in out.err + out.out and pg.password not in out.err + out.out
    assert not (tmp_path / "runs" / "x" / "run.json").exists()
