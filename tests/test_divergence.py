"""A diverging run stops at once: a real 2-worker gloo run whose loss turns NaN mid-epoch."""

from __future__ import annotations

import json
import re

import pytest
import torch

from cliplung.config import load_config
from cliplung.model import ModelEMA, build_model
from cliplung.train.step import DivergedError, LossMonitor, ema_divergence


def test_non_finite_ema_weights_are_a_divergence() -> None:
    cfg = load_config("debug")
    ema = ModelEMA(build_model(cfg.model, num_classes=3, patch_size=16).classifier, decay=0.9)
    monitor = LossMonitor(torch.device("cpu"), names=("loss", "ce"))
    monitor.start_epoch(2)
    monitor.record([torch.tensor(1.5), torch.tensor(1.0)], step=7, global_step=30, lr=0.01)
    monitor.flush()
    assert ema_divergence(ema, monitor) is None
    with torch.no_grad():
        ema.module.head.weight[0, 0] = float("inf")
    d = ema_divergence(ema, monitor)
    assert (d.epoch, d.step, d.global_step, d.what) == (2, 7, 30, "non-finite EMA weights")
    assert "non-finite EMA weights; loss=1.5 ce=1, lr=0.01" in d.message(epochs=5)


@pytest.mark.slow
def test_a_diverging_run_stops_at_that_step_and_is_not_retried(ray_session, synthetic_store, tmp_path, capfd):
    from cliplung.train.trainer import train

    cfg = load_config(
        "debug",
        [
            f"data.store={synthetic_store.path}",
            f"storage.path={tmp_path}",
            "name=diverge",
            "metrics.enabled=false",
            "train.epochs=3",
            "train.debug_nan_at_step=5",  # 54 rows / 2 workers / micro-batch 8: 3 steps an epoch
            "train.max_failures=2",
        ],
    )
    with pytest.raises(DivergedError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith(
        "training diverged at epoch 2/3, step 2 of the epoch (global step 5): non-finite loss"
    )
    assert re.search(r"loss=nan ce=[\d.]+ ic=[\d.]+ ca=[\d.]+ ia=[\d.]+, lr=[\d.e-]+", message), message
    out = capfd.readouterr().out
    assert out.count("[diverged] training diverged at epoch 2/3") == 1  # rank 0 says it once
    assert "resuming from" not in out  # no worker-group restart from the last checkpoint
    assert "epoch 1/3 train/loss=" in out and "epoch 2/3 train/loss=" not in out  # epoch 2 never ends
    assert sorted(p.name for p in (tmp_path / "diverge").glob("epoch_*")) == ["epoch_0000"]
    record = json.loads((tmp_path / "diverge" / "divergence.json").read_text())
    assert record["message"] == message
    assert (record["epoch"], record["step"], record["global_step"]) == (1, 2, 5)
