"""The GPU paths, checked on a CPU: device placement, host synchronisation, DeepSpeed's device.

* **Fake CUDA** (``torch._subclasses.FakeTensorMode``): tensors on a fake ``cuda:0`` carry no data,
  so a CPU tensor meeting a CUDA one fails exactly as on a GPU, and a read of a value (``item``, a
  data-dependent shape) fails too. The training forward of every method, the per-sample reference
  (``cliplung bench model --device cuda`` crashed on its CPU targets), the augmentation, the EMA,
  the loss monitor and the memory mode's epoch layouts run there.
* **Backward on ``meta``**: autograd's engine starts a device thread per CUDA device and asks the
  CUDA driver for a context, which a machine without a GPU cannot give, so a backward pass cannot
  run on fake CUDA. The narrowest substitute is the ``meta`` device: also data-free, it refuses CPU
  operands just like CUDA (``Tensor on device cpu is not on the expected device meta``), and has
  no value to read.
* **Host syncs per step** (:class:`cliplung.bench.syncs.HostSyncCounter`): on fake CUDA every read
  and blocking copy our code makes in a step shows; on the CPU path a real DeepSpeed engine's step
  (ZeRO 0/1/2, fp32 and bf16) is counted, DeepSpeed's own device synchronisations included.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch
from process_group import single_process_group  # noqa: F401 - fixture
from torch._subclasses.fake_tensor import FakeTensorMode
from torch_threads import one_torch_thread  # noqa: F401 - autouse fixture

from cliplung.bench.syncs import HostSyncCounter
from cliplung.config import ATTRIBUTES, AugmentConfig, load_config, preset
from cliplung.data.augment import augment_batch, epoch_generator
from cliplung.model import ModelEMA, build_model
from cliplung.model.attributes import RATING_RANGES
from cliplung.model.reference import reference_forward
from cliplung.train.step import LossMonitor, build_engine, loss_parts, train_step

PATCH = 16
CUDA = torch.device("cuda", 0)


def _model(**changes):
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("debug").model, **changes)
    return build_model(cfg, num_classes=3, patch_size=PATCH)


def _batch(device, b: int = 4):
    lo = torch.tensor([RATING_RANGES[a][0] for a in ATTRIBUTES], dtype=torch.float)
    hi = torch.tensor([RATING_RANGES[a][1] for a in ATTRIBUTES], dtype=torch.float)
    g = torch.Generator().manual_seed(0)
    batch = {
        "patches": torch.rand(b, PATCH, PATCH, PATCH, generator=g),
        "label": torch.arange(b) % 3,
        "attributes": lo + (hi - lo) * torch.rand(b, len(ATTRIBUTES), generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _fake_cuda():
    return FakeTensorMode(allow_non_fake_inputs=True)


METHODS = [
    {"method": "ce"},
    {"method": "coop"},
    {"method": "cocoop"},
    {"method": "cliplung"},
    {"method": "cliplung", "attribute_prompts": "rating"},
    {"method": "cliplung", "image_encoder": "resnet18_3d"},
]


@pytest.mark.parametrize("changes", METHODS, ids=lambda c: "-".join(c.values()))
def test_training_forward_on_fake_cuda_reads_nothing_back(changes) -> None:
    model = _model(**changes)
    with _fake_cuda():
        model = model.to(CUDA)
        batch = _batch(CUDA)
        with HostSyncCounter(fake_reads=True) as syncs:
            out = model(batch["patches"], labels=batch["label"], attributes=batch["attributes"])
            logits = model.predict(batch["patches"])
    assert out["loss"].device == CUDA and out["loss"].dtype == torch.float32
    assert all(v.device == CUDA for v in out["parts"].values())
    assert logits.device == CUDA and logits.shape == (4, 3)
    assert syncs.total == 0, syncs.sites


@pytest.mark.parametrize("changes", METHODS, ids=lambda c: "-".join(c.values()))
def test_training_backward_on_meta_keeps_every_gradient_on_the_device(changes) -> None:
    model = _model(**changes).to("meta")
    batch = _batch("meta")
    out = model(batch["patches"], labels=batch["label"], attributes=batch["attributes"])
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device.type == "meta" for g in grads)


def test_per_sample_reference_runs_on_fake_cuda() -> None:
    # cliplung bench model --device cuda crashed here: CPU cross-entropy targets for CUDA logits.
    model = _model(attribute_prompts="rating")
    with _fake_cuda():
        model = model.to(CUDA)
        batch = _batch(CUDA)
        out = reference_forward(model, batch["patches"], batch["label"], batch["attributes"])
    assert out["loss"].device == CUDA


def test_reference_on_meta_backward() -> None:
    model = _model().to("meta")
    batch = _batch("meta")
    reference_forward(model, batch["patches"], batch["label"], batch["attributes"])["loss"].backward()
    assert model.prompts.ctx.grad.device.type == "meta"


def test_augmentation_ema_and_loss_monitor_on_fake_cuda_do_not_block() -> None:
    model = _model()
    ema = ModelEMA(model.classifier, decay=0.9)
    monitor = LossMonitor(CUDA, lag=2)  # its host buffer is real memory (pinned on a real GPU)
    gen = epoch_generator(0, 0, 0)  # the loop's generator: on the host, the same stream on any device
    with _fake_cuda():
        model = model.to(CUDA)
        ema.module.to(CUDA)
        batch = _batch(CUDA)
        with HostSyncCounter(fake_reads=True) as syncs:
            images = augment_batch(batch["patches"], gen, AugmentConfig())
            out = model(images, labels=batch["label"], attributes=batch["attributes"])
            ema.update(model.classifier)
            finite = ema.all_finite()
            parts = [out["loss"], *out["parts"].values()]
            monitor.record(parts, step=1, global_step=1, lr=1e-3)
    assert images.device == CUDA and images.shape == batch["patches"].shape
    assert finite.device == CUDA
    assert syncs.total == 0, syncs.sites


def test_the_counter_sees_what_used_to_block() -> None:
    # The patterns of the step before this change: float() of loss parts, constants built from Python
    # numbers on the device, CPU randomness copied with a blocking .to().
    with _fake_cuda(), HostSyncCounter(fake_reads=True) as syncs:
        loss = torch.rand((), device=CUDA)
        float(loss)
        torch.tensor([1.0, 5.0], device=CUDA)
        torch.rand(4, 3).to(CUDA)
        torch.rand(4, 3).to(CUDA, non_blocking=True)  # pinned on a real GPU: not a sync
        loss.item()
    assert syncs.by_kind == {
        "read (__float__)": 1,
        "host data to cuda (tensor)": 1,
        "blocking copy (cpu to cuda)": 1,
        "read (item)": 1,
    }, syncs.by_kind


def _count_accelerator_syncs():
    """Patch DeepSpeed's accelerator ``synchronize`` (a no-op on the CPU accelerator, a device sync
    on a GPU) to count its calls."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return mock.patch.object(accelerator, "synchronize", wraps=accelerator.synchronize)


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
@pytest.mark.usefixtures("single_process_group")
def test_cpu_training_step_makes_no_host_sync(zero_stage, precision, grad_clip) -> None:
    cfg = load_config(
        "debug",
        [
            "train.workers=1",
            "train.batch_size=4",
            f"train.zero_stage={zero_stage}",
            f"train.precision={precision}",
            f"train.grad_clip={grad_clip}",
        ],
    )
    torch.manual_seed(0)
    run = build_engine(cfg, build_model(cfg.model, num_classes=3, patch_size=PATCH), torch.device("cpu"), 10)
    monitor = LossMonitor(torch.device("cpu"), names=loss_parts(cfg))
    gen = epoch_generator(0, 0, 0)
    batch = _batch("cpu")
    parts, lr = train_step(run, batch, gen, cfg, 0)  # first step: lazy state, not counted
    monitor.record(parts, step=1, global_step=1, lr=lr)
    steps = 3
    with _count_accelerator_syncs() as device_syncs, HostSyncCounter() as syncs:
        for i in range(1, steps + 1):
            parts, lr = train_step(run, batch, gen, cfg, i)
            monitor.record(parts, step=i + 1, global_step=i + 1, lr=lr)
    # ZeRO 1/2 with clipping: DeepSpeed checks the gradient norm's validity twice a step (a read each).
    expected = 2 * steps if zero_stage > 0 and grad_clip > 0 else 0
    assert syncs.total == expected, syncs.sites
    assert device_syncs.call_count == 0
    monitor.flush()
    assert monitor.steps == steps + 1 and monitor.divergence is None


def test_memory_mode_lays_out_epochs_on_fake_cuda_without_a_thread_or_a_sync() -> None:
    """On a GPU the memory mode's shard lives on the device: each epoch's layout is gathered there
    (asynchronous kernels, in the loop's thread: no background thread) and the batches are views."""
    import numpy as np

    from cliplung.data import ingest

    rng = np.random.default_rng(0)
    n = 40
    rows = {
        "patches": rng.random((n, PATCH, PATCH, PATCH)).astype(np.float16),
        "label": rng.integers(0, 3, n),
        "attributes": rng.random((n, len(ATTRIBUTES))).astype(np.float32),
        "index": np.arange(n),
    }
    no_thread = mock.patch.object(ingest, "_Background", side_effect=AssertionError("a thread on a GPU"))
    with _fake_cuda(), no_thread:
        data = ingest.MemoryData.of_arrays(
            rows, {k: v[:8] for k, v in rows.items()}, seed=0, rank=0, device=CUDA
        )
        with HostSyncCounter(fake_reads=True) as syncs:
            epochs = [list(data.train_batches(epoch, 8)) for epoch in (0, 1, 2)]
            val = list(data.val_batches(4))
    assert all(len(e) == n // 8 for e in epochs) and len(val) == 2
    assert {b[k].device for e in epochs for b in e for k in b} == {CUDA}
    assert syncs.total == 0, syncs.sites
