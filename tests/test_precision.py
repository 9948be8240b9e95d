"""Precision and checkpoints of the DeepSpeed engine, on a CPU with a one-process gloo group.

``train.precision: bf16`` is fp32 weights with the forward under DeepSpeed's ``torch_autocast``
(bf16 autocast works on CPUs too), so everything here is the GPU design run where it can run: which
optimizer DeepSpeed wraps, that the optimizer starts fresh and steps as plain torch does, that the
EMA follows the fp32 weights, that losses and gradient communication stay fp32, and that a
checkpoint (with or without optimizer state) resumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import ray.train
import torch
from process_group import single_process_group  # noqa: F401 - fixture
from torch_threads import one_torch_thread  # noqa: F401 - autouse fixture

from cliplung.config import ATTRIBUTES, load_config
from cliplung.data.augment import augment_batch, epoch_generator
from cliplung.model import build_model
from cliplung.model.attributes import RATING_RANGES
from cliplung.train import loop
from cliplung.train.preflight import TRAIN_STATE_FILE, checkpoint_identity
from cliplung.train.step import (
    build_engine,
    configure_kernels,
    deepspeed_config,
    make_optimizer,
    prebuild_deepspeed_ops,
    train_step,
)

pytestmark = pytest.mark.usefixtures("single_process_group")

PATCH = 16
CPU = torch.device("cpu")


def _config(*extra: str):
    return load_config("debug", ["train.workers=1", "train.batch_size=4", "train.ema_decay=0.9", *extra])


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model, num_classes=3, patch_size=PATCH)


def _batch(b: int = 4, seed: int = 0):
    lo = torch.tensor([RATING_RANGES[a][0] for a in ATTRIBUTES], dtype=torch.float)
    hi = torch.tensor([RATING_RANGES[a][1] for a in ATTRIBUTES], dtype=torch.float)
    g = torch.Generator().manual_seed(seed)
    return {
        "patches": torch.rand(b, PATCH, PATCH, PATCH, generator=g),
        "label": torch.arange(b) % 3,
        "attributes": lo + (hi - lo) * torch.rand(b, len(ATTRIBUTES), generator=g),
    }


def _basic(run):
    """The torch optimizer inside the engine."""
    return (
        run.engine.optimizer if run.engine.zero_optimization_stage() == 0 else run.engine.optimizer.optimizer
    )


GRID = [(zero, precision) for zero in (0, 1, 2) for precision in ("fp32", "bf16")]


@pytest.mark.parametrize(("zero", "precision"), GRID)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_starts_fresh_and_steps_like_plain_torch(zero, precision, optimizer) -> None:
    cfg = _config(f"train.zero_stage={zero}", f"train.precision={precision}", f"train.optimizer={optimizer}")
    run = build_engine(cfg, _model(cfg), CPU, 10)
    cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    basic = _basic(run)
    assert type(basic) is cls
    if zero == 0:
        assert run.engine.optimizer is basic  # no DeepSpeed wrapper at all
    else:
        assert type(run.engine.optimizer).__name__ == "DeepSpeedZeroOptimizer"
    # Construction took no step: the state is a fresh torch optimizer's (empty), hyperparameters too.
    assert basic.state_dict()["state"] == {}
    reference_model = _model(cfg)
    ref_params = [p for p in reference_model.parameters() if p.requires_grad]
    reference = make_optimizer(cfg, ref_params, CPU)
    fresh = reference.state_dict()
    assert fresh["state"] == {}
    hyper = [{k: v for k, v in g.items() if k not in ("params", "initial_lr")} for g in fresh["param_groups"]]
    assert [
        {k: v for k, v in g.items() if k not in ("params", "initial_lr")} for g in basic.param_groups
    ] == hyper

    batch = _batch()
    train_step(run, batch, epoch_generator(0, 0, 0), cfg, 0)
    images = augment_batch(batch["patches"], epoch_generator(0, 0, 0), cfg.train.augment)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = reference_model(images, labels=batch["label"], attributes=batch["attributes"])
    out["loss"].backward()
    reference.step()
    trained = dict(run.engine.module.named_parameters())
    for name, p in reference_model.named_parameters():
        assert torch.equal(trained[name], p), f"{name} differs from a plain torch step"
    if optimizer == "adamw" and zero == 0:
        steps = {float(s["step"]) for s in basic.state.values()}
        assert steps == {1.0}  # AdamW's first step is step 1, not 2


def test_bf16_trains_fp32_weights_and_the_ema_follows_them() -> None:
    cfg = _config("train.precision=bf16", "train.optimizer=sgd", "train.lr=0.01")
    run = build_engine(cfg, _model(cfg), CPU, 10)
    assert run.precision == "bf16"
    assert all(p.dtype == torch.float32 for p in run.engine.module.parameters())
    before = {k: v.clone() for k, v in run.ema.module.state_dict().items()}
    train_step(run, _batch(), epoch_generator(0, 0, 0), cfg, 0)
    weights = dict(run.engine.module.classifier.named_parameters())
    moved = 0
    for name, p in run.ema.module.named_parameters():
        expected = torch.lerp(before[name], weights[name].detach(), 1 - cfg.train.ema_decay)
        assert torch.equal(p, expected), name
        assert p.dtype == torch.float32
        # A bf16 copy could not hold these values: the averages live between bf16 numbers.
        moved += int(not torch.equal(p, p.bfloat16().float()))
    assert moved > 0
    assert set(run.ema.module.state_dict()) == set(run.engine.module.classifier.state_dict())


def test_losses_stay_fp32_under_bf16_autocast() -> None:
    cfg = _config("train.precision=bf16")
    run = build_engine(cfg, _model(cfg), CPU, 10)
    batch = _batch()
    out = run.engine(batch["patches"], labels=batch["label"], attributes=batch["attributes"])
    assert out["logits"].dtype == torch.bfloat16  # the forward did run in bf16
    assert out["loss"].dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out["parts"].values())


def test_bf16_reduces_gradients_in_fp32() -> None:
    from deepspeed.runtime.torch_autocast import get_comm_dtype

    cfg = _config("train.precision=bf16", "train.zero_stage=2")
    ds = deepspeed_config(cfg, use_gpu=True, precision="bf16")
    assert ds["bf16"]["enabled"] is False and ds["torch_autocast"]["enabled"] is True
    assert ds["timers"]["throughput"]["enabled"] is False  # its default syncs the device twice a step
    run = build_engine(cfg, _model(cfg), CPU, 10)
    assert {get_comm_dtype(p) for p in run.engine.module.parameters()} == {torch.float32}
    assert deepspeed_config(_config("train.precision=auto"), use_gpu=False).get("torch_autocast") is None


def _checkpoint(run, cfg, directory: Path, *, with_optimizer: bool, epoch: int = 0, step: int = 1) -> Path:
    state = {
        "epoch": epoch,
        "global_step": step,
        "metrics": {},
        "optimizer_state": with_optimizer,
        **checkpoint_identity(cfg, 1, run.precision),
    }
    directory.mkdir(parents=True)
    loop._save_checkpoint(directory, run, cfg, state, 0)
    return directory


@pytest.mark.parametrize("zero", [0, 1, 2])
@pytest.mark.parametrize("with_optimizer", [True, False], ids=["full", "weights-only"])
def test_checkpoint_resumes_and_holds_no_frozen_weights(tmp_path, zero, with_optimizer) -> None:
    cfg = _config(f"train.zero_stage={zero}", "train.optimizer=sgd")
    run = build_engine(cfg, _model(cfg), CPU, 10)
    batch = _batch()
    train_step(run, batch, epoch_generator(0, 0, 0), cfg, 0)
    ckpt = _checkpoint(run, cfg, tmp_path / "epoch_0000", with_optimizer=with_optimizer)

    frozen = {n for n, p in run.engine.module.named_parameters() if not p.requires_grad}
    assert "text_encoder.tower.token_embedding.weight" in frozen
    if with_optimizer:
        (states,) = (ckpt / "deepspeed" / loop.DEEPSPEED_TAG).glob("mp_rank_00_model_states.pt")
        saved = torch.load(states, map_location="cpu", weights_only=False)["module"]
    else:
        assert not (ckpt / "deepspeed").exists()
        saved = torch.load(ckpt / loop.WEIGHTS_FILE, weights_only=True)["module"]
    assert not frozen & set(saved)
    # The EMA covers the image encoder + head only, and its weights are stored once: in model.pt.
    assert set(torch.load(ckpt / "ema.pt", weights_only=True)) == {"decay", "updates"}
    exported = torch.load(ckpt / "model.pt", weights_only=True)["state_dict"]
    assert (
        exported.keys()
        == run.ema.module.state_dict().keys()
        == run.engine.module.classifier.state_dict().keys()
    )
    state = json.loads((ckpt / TRAIN_STATE_FILE).read_text())
    assert state["optimizer_state"] is with_optimizer and state["zero_stage"] == zero

    resumed = build_engine(cfg, _model(cfg), CPU, 10)
    epoch, step, note, _state = loop._resume(
        ray.train.Checkpoint.from_directory(str(ckpt)), resumed, cfg, 0, 1
    )
    assert (epoch, step) == (1, 1)
    assert ("no optimizer state" in note) is not with_optimizer
    a, b = run.engine.module.state_dict(), resumed.engine.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(
        torch.equal(v, resumed.ema.module.state_dict()[k]) for k, v in run.ema.module.state_dict().items()
    )
    assert resumed.scheduler.state_dict() == run.scheduler.state_dict()
    # The next step: identical with the optimizer state, different (momentum restarts) without it.
    for r in (run, resumed):
        train_step(r, _batch(seed=1), epoch_generator(0, 1, 0), cfg, 1)
    a, b = run.engine.module.state_dict(), resumed.engine.module.state_dict()
    same = all(torch.equal(a[k], b[k]) for k in a)
    assert same is with_optimizer


def test_optimizer_state_every_n_epochs_and_always_the_last() -> None:
    cfg = _config("train.epochs=5", "train.optimizer_state_every=2")
    assert [loop.optimizer_state_due(cfg, e) for e in range(5)] == [False, True, False, True, True]
    assert all(loop.optimizer_state_due(_config("train.epochs=3"), e) for e in range(3))


def test_compile_switch_and_kernel_choice(monkeypatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored afterwards
    cfg = _config("train.compile=true")
    run = build_engine(cfg, _model(cfg), CPU, 10)
    assert run.engine.is_compiled  # compiled lazily, at the first step
    assert not build_engine(_config(), _model(_config()), CPU, 10).engine.is_compiled
    saved = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
    )
    try:
        configure_kernels(_config(), torch.device("cuda", 0))
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        configure_kernels(_config("train.deterministic=true"), torch.device("cuda", 0))
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2])


def test_the_op_built_at_setup_is_the_one_a_cpu_run_loads_without_building_again() -> None:
    """``make setup`` runs :func:`prebuild_deepspeed_ops`; the first ``deepspeed.initialize`` on the
    CPU then finds the shared-memory op where torch keeps JIT builds instead of compiling it (about
    25 s on 2 cores, in the first run or the first test)."""
    from torch.utils.cpp_extension import _get_build_directory  # torch's own rule for the folder

    assert prebuild_deepspeed_ops() == "DeepSpeed (cpu accelerator): shared-memory communication op built"
    library = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "deepspeed_shm_comm.so"
    built = library.stat().st_mtime_ns
    cfg = _config()
    run = build_engine(cfg, _model(cfg), CPU, opt_steps_per_epoch=1)
    assert torch.device(run.engine.device) == CPU
    assert library.stat().st_mtime_ns == built  # loaded, not rebuilt
