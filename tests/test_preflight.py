"""Preflight checks (CUDA, bf16, resume compatibility), the GPU layout rules of the config, and the
divergence machinery's pieces (loss monitor, message, the driver's raise). No Ray, no processes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cliplung import cli
from cliplung.config import ConfigError, load_config
from cliplung.train.preflight import (
    CHECKPOINT_FORMAT,
    CudaProbe,
    check_cuda,
    check_precision,
    check_resume,
    checkpoint_identity,
    preflight,
    probe_cuda,
)
from cliplung.train.step import (
    DIVERGED_KEY,
    DIVERGENCE_KEY,
    DivergedError,
    LossMonitor,
    divergence_file,
    raise_if_diverged,
    resolve_precision,
)

GPU = ["train.gpus_per_worker=1", "train.workers=1"]


def _probe(**changes) -> CudaProbe:
    base = {
        "torch_version": "2.14.1+cu130",
        "torch_cuda": "13.0",
        "driver_version": "550.54.15",
        "available": False,
        "error": "The NVIDIA driver on your system is too old (found version 12040)",
        "devices": (),
    }
    return CudaProbe(**{**base, **changes})


def test_unusable_cuda_names_driver_and_torch_cuda() -> None:
    cfg = load_config("debug", GPU)
    with pytest.raises(ConfigError, match=r"^train\.gpus_per_worker") as err:
        check_cuda(cfg, _probe())
    message = str(err.value)
    assert "550.54.15" in message and "CUDA 13.0" in message and "R580" in message
    assert "too old" in message and "train.gpus_per_worker=0" in message
    with pytest.raises(ConfigError, match="no NVIDIA driver found"):
        check_cuda(cfg, _probe(driver_version=None, error="Found no NVIDIA driver on your system"))
    check_cuda(load_config("debug"), _probe())  # CPU training needs no CUDA
    ok = _probe(
        available=True, error=None, devices=({"index": 0, "name": "H200", "capability": "9.0", "bf16": True},)
    )
    check_cuda(cfg, ok)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")
def test_this_machine_without_a_gpu_is_refused_with_its_real_versions() -> None:
    probe = probe_cuda()
    assert not probe.available and probe.torch_cuda == torch.version.cuda
    with pytest.raises(ConfigError) as err:
        preflight(load_config("debug", GPU), probe=probe)
    assert str(torch.version.cuda) in str(err.value)


def test_bf16_on_a_gpu_without_it() -> None:
    t4 = {"index": 0, "name": "Tesla T4", "capability": "7.5", "bf16": False}
    probe = _probe(available=True, error=None, devices=(t4,))
    with pytest.raises(ConfigError, match=r"^train\.precision: bf16 .*Tesla T4.*7\.5.*train\.precision=fp32"):
        check_precision(load_config("debug", [*GPU, "train.precision=bf16"]), probe)
    check_precision(load_config("debug", [*GPU, "train.precision=auto"]), probe)  # auto picks fp32 there
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # CPU autocast has bf16


def _state(cfg, **changes) -> dict:
    return {
        "epoch": 3,
        "global_step": 40,
        "optimizer_state": True,
        **checkpoint_identity(cfg, 2, "bf16"),
        **changes,
    }


def test_resume_refuses_what_cannot_load_and_allows_the_rest() -> None:
    cfg = load_config("debug", ["train.zero_stage=1"])
    check_resume(cfg, _state(cfg), checkpoint="runs/x/epoch_0003")
    # Precision never blocks (fp32 weights and optimizer state either way); nor do loss weights.
    check_resume(
        load_config("debug", ["train.zero_stage=1", "train.precision=fp32", "model.lambda_ia=0"]), _state(cfg)
    )
    cases = [
        ({"format": 1}, cfg, "format 1"),
        ({}, load_config("debug", ["train.zero_stage=0"]), r"^train\.zero_stage: .*stage 1"),
        (
            {},
            load_config("debug", ["train.zero_stage=1", "train.workers=1", "train.batch_size=8"]),
            r"^train\.workers",
        ),
        ({}, load_config("debug", ["train.zero_stage=1", "model.n_ctx=8"]), r"^model\.n_ctx: .*n_ctx=4"),
        ({}, load_config("debug", ["train.zero_stage=1", "data.task=2class"]), r"^data\.task"),
    ]
    for changes, config, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            check_resume(config, {**_state(cfg), **changes}, checkpoint="runs/x/epoch_0003")
    old = {k: v for k, v in _state(cfg).items() if k != "format"}
    with pytest.raises(
        ConfigError, match="runs/x/epoch_0003: written by a cliplung with checkpoint format 1"
    ):
        check_resume(cfg, old, checkpoint="runs/x/epoch_0003")
    # ZeRO 0 state is not partitioned; a weights-only checkpoint loads under any stage and world size.
    zero0 = load_config("debug", ["train.zero_stage=0"])
    check_resume(load_config("debug", ["train.workers=1", "train.batch_size=8"]), _state(zero0))
    check_resume(load_config("debug", ["train.zero_stage=2"]), _state(cfg, optimizer_state=False))
    assert _state(cfg)["format"] == CHECKPOINT_FORMAT


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (
            ["train.gpus_per_worker=2", "train.workers=1"],
            r"train\.gpus_per_worker: one worker drives one GPU.*workers=N",
        ),
        (
            ["train.gpus_per_worker=1.5", "train.workers=1"],
            r"train\.gpus_per_worker: one worker drives one GPU",
        ),
        (
            ["train.gpus_per_worker=0.25", "train.workers=2"],
            r"train\.gpus_per_worker: 0\.25 .*NCCL.*workers=1",
        ),
        (
            ["train.gpus_per_worker=1", "train.workers=8", "train.batch_size=32"],
            r"train\.batch_size: .*4 samples per GPU",
        ),
    ],
)
def test_gpu_layouts_nccl_cannot_run_are_refused_with_what_to_use(overrides, pattern, capsys) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config("debug", overrides)
    rc = cli.main(["train", *(arg for o in overrides for arg in ("--set", o))])
    assert rc == cli.EXIT_BAD_INPUT
    assert "train." in capsys.readouterr().err


def test_gpu_layouts_that_run() -> None:
    for preset, gpus, workers in (
        ("debug", 0.25, 1),  # Tune packs trials on a GPU
        ("paper", 1, 1),
        ("paper", 1, 2),  # 16 per GPU
        ("debug", 0, 2),  # CPU workers: no GPU rules
    ):
        t = load_config(preset, [f"train.gpus_per_worker={gpus}", f"train.workers={workers}"]).train
        assert (t.gpus_per_worker, t.workers) == (gpus, workers)


def test_loss_monitor_reads_late_sums_exactly_and_finds_the_first_bad_step() -> None:
    monitor = LossMonitor(torch.device("cpu"), lag=2, names=("loss", "ce"))
    monitor.start_epoch(4)
    values = [(1.0, 0.5), (2.0, 1.0), (float("nan"), 0.25), (float("inf"), 0.75)]
    for i, (loss, ce) in enumerate(values, start=1):
        monitor.record([torch.tensor(loss), torch.tensor(ce)], step=i, global_step=100 + i, lr=0.1 * i)
        assert monitor.steps == max(0, i - 2)  # read two steps late
        if i < 3:
            assert monitor.divergence is None
    assert monitor.divergence is None  # step 3 is not read yet
    monitor.flush()
    d = monitor.divergence
    assert (d.epoch, d.step, d.global_step) == (4, 3, 103) and d.lr == pytest.approx(0.3)
    assert math.isnan(d.values["loss"]) and d.values["ce"] == 0.25
    message = d.message(epochs=10)
    assert message.startswith("training diverged at epoch 5/10, step 3 of the epoch (global step 103)")
    assert "loss=nan ce=0.25, lr=0.3" in message and "not retried" in message
    assert monitor.steps == 4 and monitor.means()["ce"] == pytest.approx(0.625)


def test_driver_raises_on_a_divergence_record_or_report_only(tmp_path) -> None:
    cfg = load_config("debug", [f"storage.path={tmp_path}", "name=run1"])
    raise_if_diverged(cfg)  # no record
    raise_if_diverged(cfg, {"epoch": 3, "val/macro_f1": 0.5})
    with pytest.raises(DivergedError, match="training diverged at epoch 2"):
        raise_if_diverged(cfg, {DIVERGED_KEY: 1.0, DIVERGENCE_KEY: "training diverged at epoch 2/3, ..."})
    _, path = divergence_file(cfg)
    assert path == f"{tmp_path}/run1/divergence.json"
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "divergence.json").write_text(
        json.dumps({"message": "training diverged at epoch 4/9"})
    )
    with pytest.raises(DivergedError, match="epoch 4/9"):
        raise_if_diverged(cfg)
