"""Early stopping: the decision, its record in the checkpoint, resume, and "a stopped run is complete"."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cliplung.config import ConfigError, apply_overrides, load_config
from cliplung.train.early_stopping import STATE_KEY, EarlyStopping, read_train_state, stopped_early


def _train_cfg(*overrides: str):
    return load_config("debug", list(overrides)).train


def _run(stopper: EarlyStopping, values, start: int = 0) -> list[bool]:
    out = []
    for epoch, v in enumerate(values, start=start):
        stopper.after_epoch(epoch, {"val/macro_f1": v, "val/auc": 0.5, "train/loss": 1.0 / (epoch + 1)})
        out.append(stopper.stopped)
        if stopper.stopped:
            break
    return out


def test_stops_after_patience_epochs_without_a_gain_larger_than_min_delta():
    t = _train_cfg("train.early_stopping.patience=2", "train.early_stopping.min_delta=0.01")
    stopper = EarlyStopping(t)
    # 0.5 best; 0.505 is not a gain > 0.01; 0.52 is; then two epochs without one.
    assert _run(stopper, [0.5, 0.505, 0.52, 0.525, 0.51, 0.9]) == [False, False, False, False, True]
    assert (stopper.best, stopper.best_epoch, stopper.stopped_epoch) == (0.52, 2, 4)
    record = stopper.state()[STATE_KEY]
    assert record["history"]["epoch"] == [0, 1, 2, 3, 4]
    assert record["history"]["val/macro_f1"] == [0.5, 0.505, 0.52, 0.525, 0.51]
    assert record["history"]["train/loss"][0] == 1.0
    assert json.loads(json.dumps(record)) == record
    assert (
        "early stopping after epoch 5" in stopper.summary() and "best 0.5200 at epoch 3" in stopper.summary()
    )


def test_min_mode_nan_and_no_patience():
    t = _train_cfg(
        "train.checkpoint_metric=train/loss", "train.checkpoint_mode=min", "train.early_stopping.patience=1"
    )
    stopper = EarlyStopping(t)
    stopper.after_epoch(0, {"train/loss": 2.0})
    stopper.after_epoch(1, {"train/loss": 1.5})
    assert not stopper.stopped
    stopper.after_epoch(2, {"train/loss": math.nan})  # never an improvement
    assert stopper.stopped and stopper.best == 1.5
    never = EarlyStopping(_train_cfg())
    assert _run(never, [0.9, 0.1, 0.1, 0.1, 0.1]) == [False] * 5  # patience None: history only
    assert never.state()[STATE_KEY]["history"]["val/macro_f1"] == [0.9, 0.1, 0.1, 0.1, 0.1]


def test_resumed_stopper_decides_as_an_uninterrupted_one():
    t = _train_cfg("train.early_stopping.patience=3")
    values = [0.3, 0.4, 0.35, 0.38, 0.41, 0.39, 0.39, 0.2, 0.1]
    whole = EarlyStopping(t)
    expected = _run(whole, values)
    first = EarlyStopping(t)
    _run(first, values[:4])
    state = json.loads(json.dumps({"epoch": 3, **first.state()}))  # as train_state.json keeps it
    resumed = EarlyStopping(t, state)
    assert _run(resumed, values[4:], start=4) == expected[4:]
    assert resumed.state() == whole.state()
    # A worker restart replays an epoch already in the history: the later entries are dropped.
    resumed.after_epoch(5, {"val/macro_f1": 0.39})
    assert resumed.history["epoch"][-1] == 5 and resumed.history["epoch"].count(5) == 1


def test_a_stopper_resumed_from_its_train_state_decides_as_the_uninterrupted_one(tmp_path: Path):
    """What the loop does on resume: the record in the checkpoint's ``train_state.json`` (as
    ``_resume`` read it) rebuilds the stopper; no record gives a fresh one."""
    t = _train_cfg("train.early_stopping.patience=3")
    values = [0.3, 0.4, 0.35, 0.38, 0.41, 0.39, 0.39, 0.2, 0.1]
    whole = EarlyStopping(t)
    expected = _run(whole, values)
    first = EarlyStopping(t)
    _run(first, values[:4])
    (tmp_path / "train_state.json").write_text(json.dumps({"epoch": 3, **first.state()}))
    resumed = EarlyStopping(t, read_train_state(str(tmp_path)))
    assert resumed.bad_epochs == first.bad_epochs and resumed.best_epoch == 1
    assert _run(resumed, values[4:], start=4) == expected[4:]
    assert resumed.state() == whole.state()
    fresh = EarlyStopping(t, None)
    assert fresh.best is None and fresh.history == {"epoch": []}


def test_config_validation():
    with pytest.raises(ConfigError, match=r"^train\.early_stopping\.patience: must be in \[1,"):
        load_config("debug", ["train.early_stopping.patience=0"])
    with pytest.raises(ConfigError, match=r"^train\.early_stopping\.min_delta: must be >= 0"):
        load_config("debug", ["train.early_stopping.min_delta=-0.1"])
    with pytest.raises(ConfigError, match=r"^train\.early_stopping\.wait: no such config field"):
        load_config("debug", ["train.early_stopping.wait=1"])


def _checkpoint(run: Path, epoch: int, record: dict | None) -> Path:
    from cliplung.model import build_model, save_inference
    from cliplung.train.preflight import checkpoint_identity

    ckpt = run / f"epoch_{epoch:04d}"
    cfg = load_config("debug")
    save_inference(build_model(cfg.model, num_classes=3, patch_size=16), cfg, ckpt / "model.pt")
    state = {
        "epoch": epoch,
        "global_step": epoch,
        "metrics": {"epoch": epoch, "val/macro_f1": 0.5},
        # What the loop records, so a run that did not stop passes the resume checks and resumes.
        "optimizer_state": False,
        **checkpoint_identity(cfg, cfg.train.workers, "fp32"),
    }
    if record is not None:
        state[STATE_KEY] = record
    (ckpt / "train_state.json").write_text(json.dumps(state))
    return ckpt


def test_stopped_early_reads_the_checkpoint_record(tmp_path: Path):
    assert stopped_early(str(tmp_path / "nothing")) is None
    ckpt = _checkpoint(tmp_path, 0, {"stopped": False})
    assert stopped_early(str(ckpt)) is None
    (ckpt / "train_state.json").write_text("{not json")
    assert read_train_state(str(ckpt)) is None and stopped_early(str(ckpt)) is None
    ckpt = _checkpoint(tmp_path, 1, {"stopped": True, "stopped_epoch": 1})
    assert stopped_early(str(ckpt))["stopped_epoch"] == 1


def test_a_run_that_stopped_early_is_complete_on_resume(tmp_path: Path, synthetic_store, capsys, forbid_ray):
    """``train()`` with a run whose newest checkpoint recorded the stop returns at once (no Ray),
    even with more epochs asked for; a run that did not stop would resume."""
    from cliplung.data.ingest import compute_splits
    from cliplung.runs import Run
    from cliplung.train.trainer import train

    cfg = load_config(
        "debug",
        [
            f"data.store={synthetic_store.path}",
            f"storage.path={tmp_path / 'runs'}",
            "name=stopped",
            "train.epochs=10",
            "train.early_stopping.patience=2",
        ],
    )
    run = Run.of(cfg)
    run.start(
        cfg,
        kind="train",
        store=synthetic_store,
        splits=compute_splits(synthetic_store, cfg.data).record(cfg.data.store),
    )
    _checkpoint(Path(run.location), 2, {"stopped": False})
    _checkpoint(Path(run.location), 3, {"stopped": True, "stopped_epoch": 3})
    summary = train(apply_overrides(cfg, ["train.epochs=20"]))
    assert summary.already_complete and summary.epochs_done == 4
    out = capsys.readouterr().out
    assert "run stopped is complete (stopped early, 4 of 20 epochs done" in out

    (Path(run.location) / "epoch_0003" / "train_state.json").unlink()  # newest without a record
    with pytest.raises(AssertionError, match="Ray was started"):
        train(cfg)


@pytest.mark.slow
def test_real_run_stops_early_records_it_and_is_complete_afterwards(
    tmp_path: Path, synthetic_store, ray_session, capfd
):
    """One worker, a min delta no epoch can beat: the run stops after 1 + patience epochs, its last
    checkpoint says so, and running it again trains nothing."""
    from cliplung.runs import Run
    from cliplung.train.trainer import train

    cfg = load_config(
        "debug",
        [
            f"data.store={synthetic_store.path}",
            f"storage.path={tmp_path / 'runs'}",
            "name=es",
            "train.epochs=6",
            "train.workers=1",
            "train.early_stopping.patience=2",
            "train.early_stopping.min_delta=1.0",
            "metrics.enabled=false",
        ],
    )
    summary = train(cfg, address=ray_session)
    assert summary.epochs_done == 3 and not summary.already_complete
    latest = Run.of(cfg).latest_checkpoint()
    record = stopped_early(latest.location)
    assert record and record["stopped_epoch"] == 2 and record["best_epoch"] == 0
    assert record["history"]["epoch"] == [0, 1, 2] and len(record["history"]["val/macro_f1"]) == 3
    assert "early stopping after epoch 3" in capfd.readouterr().out
    again = train(cfg, address=ray_session)
    assert again.already_complete and again.epochs_done == 3
