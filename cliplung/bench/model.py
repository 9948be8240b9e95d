"""``cliplung bench model``: what the batched text path and text-free inference buy.

On synthetic inputs of the preset's shape (random weights, nothing downloaded) it measures

* train-step samples/s (forward, backward, SGD step) of the batched text path
  (:meth:`CLIPLung.forward`) and of the per-sample, 77-token formulation
  (:func:`cliplung.model.reference.reference_forward`, the published code's shape), and their ratio;
* inference samples/s of ``cliplung``'s :meth:`~CLIPLung.predict` and of the ``ce`` baseline;
* parameter counts (all, trainable, exported for inference, ``ce``);
* peak memory: CPU, the process's peak resident set (``ru_maxrss``) after each phase; CUDA,
  ``torch.cuda.max_memory_allocated`` per phase;
* FLOPs per training step (``torch.utils.flop_counter``) and, on CUDA, achieved FLOP/s as a share of
  the GPU's dense peak (bf16 autocast and fp32 steps).

Each timing is the best of its steps after one warm-up step (the warm-up runs under the FLOP
counter); the median is printed too. The per-sample reference is slow (over ten seconds per step at
the paper preset on 2 CPU cores), so it is timed over ``min(steps, 2)`` steps. Inference alternates
single calls of the two models. On a CPU shared with other work (Linux PSI, reported), timings
swing widely and OpenMP threads waiting for each other hurt most: ``OMP_NUM_THREADS=1`` is the
steadier choice there, and the FLOP ratio does not depend on load.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from cliplung.config import ATTRIBUTES
from cliplung.config import preset as load_preset
from cliplung.model import build_model, export_inference
from cliplung.model.attributes import RATING_RANGES
from cliplung.model.reference import reference_forward

__all__ = ["bench_model"]

# Dense (no sparsity) peak tensor-core FLOP/s by GPU name fragment: (bf16, fp32 via TF32).
_PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "A10G": (70e12, 35e12),
    "L4": (121e12, 60e12),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _step_times(fn: Callable[[], Any], steps: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls (after the caller's warm-up)."""
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _counted(fn: Callable[[], Any]) -> int:
    """Run ``fn`` once (the warm-up) under torch's FLOP counter; its total FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def _inputs(batch: int, patch: int, num_classes: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    lo = torch.tensor([RATING_RANGES[a][0] for a in ATTRIBUTES], dtype=torch.float)
    hi = torch.tensor([RATING_RANGES[a][1] for a in ATTRIBUTES], dtype=torch.float)
    images = torch.rand(batch, patch, patch, patch, generator=g)
    labels = torch.arange(batch) % num_classes
    attributes = lo + (hi - lo) * torch.rand(batch, len(ATTRIBUTES), generator=g)
    return images.to(device), labels.to(device), attributes.to(device)


def _cpu_pressure() -> float | None:
    """Linux PSI: share of the last 10 s in which some runnable task waited for a CPU (None: unknown)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1]) / 100
    except (OSError, IndexError, ValueError):
        return None


def _gpu_peak(device: torch.device) -> tuple[float, float] | None:
    name = torch.cuda.get_device_name(device)
    for fragment, peak in _PEAK_FLOPS.items():
        if fragment in name:
            return peak
    return None


def bench_model(
    preset: str = "debug",
    batch: int = 8,
    device: str = "cpu",
    steps: int = 5,
    as_json: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the model benchmark, print a report (or one JSON line; nothing if ``quiet``) and return the
    numbers."""
    if batch < 1 or steps < 1:
        raise ValueError(f"bench model: --batch and --steps must be >= 1, got {batch} and {steps}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench model: --device cuda but torch sees no CUDA device")
    torch.manual_seed(0)
    cfg = load_preset(preset)
    model_cfg = dataclasses.replace(cfg.model, text_pretrained=None)  # random weights: nothing downloaded
    patch, num_classes = cfg.prepare.patch_size, cfg.data.num_classes
    model = build_model(model_cfg, num_classes=num_classes, patch_size=patch).to(dev)
    ce = build_model(
        dataclasses.replace(model_cfg, method="ce"), num_classes=num_classes, patch_size=patch
    ).to(dev)
    images, labels, attributes = _inputs(batch, patch, num_classes, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def train_step(loss_fn: Callable[[], torch.Tensor], autocast: bool = False) -> None:
        ctx = torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if autocast else nullcontext()
        with ctx:
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def batched() -> torch.Tensor:
        return model(images, labels=labels, attributes=attributes)["loss"]

    def per_sample() -> torch.Tensor:
        return reference_forward(model, images, labels, attributes)["loss"]

    result: dict[str, Any] = {
        "preset": preset,
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "batch": batch,
        "steps": steps,
        "text_model": model_cfg.text_model,
        "method": model_cfg.method,
        "n_ctx": model_cfg.n_ctx,
    }
    result["cpu_pressure_start"] = _cpu_pressure()
    model.train()
    flops = _counted(lambda: train_step(batched))  # also the warm-up step
    _reset_peak(dev)
    t_batched = _step_times(lambda: train_step(batched), steps, dev)
    result["train_batched_samples_per_s"] = batch / min(t_batched)
    result["train_batched_step_s"] = min(t_batched)
    result["train_batched_step_s_median"] = statistics.median(t_batched)
    result["peak_mib_batched"] = _peak_mib(dev)
    result["train_step_gflop"] = flops / 1e9

    ref_steps = min(steps, 2)
    ref_flops = _counted(lambda: train_step(per_sample))
    _reset_peak(dev)
    t_ref = _step_times(lambda: train_step(per_sample), ref_steps, dev)
    result["train_per_sample_samples_per_s"] = batch / min(t_ref)
    result["train_per_sample_step_s"] = min(t_ref)
    result["train_per_sample_step_s_median"] = statistics.median(t_ref)
    result["train_per_sample_steps"] = ref_steps
    result["peak_mib_per_sample"] = _peak_mib(dev)
    result["train_per_sample_step_gflop"] = ref_flops / 1e9
    result["train_speedup"] = min(t_ref) / min(t_batched)
    result["train_flop_ratio"] = ref_flops / flops
    result["train_batched_tflop_per_s"] = flops / min(t_batched) / 1e12
    if dev.type == "cuda":
        train_step(batched, autocast=True)
        _reset_peak(dev)
        t_bf16 = min(_step_times(lambda: train_step(batched, autocast=True), steps, dev))
        result["train_batched_bf16_samples_per_s"] = batch / t_bf16
        result["peak_mib_batched_bf16"] = _peak_mib(dev)
        peak = _gpu_peak(dev)
        if peak is not None:
            result["mfu_bf16"] = flops / t_bf16 / peak[0]
            result["mfu_fp32_tf32"] = flops / min(t_batched) / peak[1]

    model.eval()
    ce.eval()
    iters = max(steps * 4, 20)
    with torch.no_grad():
        model.predict(images)
        ce.predict(images)
        _reset_peak(dev)
        # One call of each in turn, best of many: background load hits both alike.
        t_model, t_ce = [], []
        for _ in range(iters):
            t_model += _step_times(lambda: model.predict(images), 1, dev)
            t_ce += _step_times(lambda: ce.predict(images), 1, dev)
        result["infer_cliplung_samples_per_s"] = batch / min(t_model)
        result["infer_ce_samples_per_s"] = batch / min(t_ce)
        result["infer_ratio"] = min(t_ce) / min(t_model)
        result["infer_iters"] = iters
        result["peak_mib_inference"] = _peak_mib(dev)

    def count(m: torch.nn.Module, trainable: bool = False) -> int:
        return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)

    result["params_total"] = count(model)
    result["params_trainable"] = count(model, trainable=True)
    result["params_inference_export"] = count(export_inference(model))
    result["params_ce"] = count(ce)

    result["cpu_pressure_end"] = _cpu_pressure()
    if quiet:
        return result
    if as_json:
        print(json.dumps(result))
    else:
        _print_report(result)
    sys.stdout.flush()
    return result


def _print_report(r: dict[str, Any]) -> None:
    mem = "peak RSS" if r["device"].startswith("cpu") else "peak alloc"
    print(
        f"cliplung bench model: preset={r['preset']} ({r['method']}, text={r['text_model']}, n_ctx={r['n_ctx']}), "
        f"batch={r['batch']}, device={r['device']}"
    )
    print("train step (forward + backward + SGD):")
    print(
        f"  batched text path     {r['train_batched_samples_per_s']:9.2f} samples/s  "
        f"(best {r['train_batched_step_s']:.3f} s/step, median {r['train_batched_step_s_median']:.3f}, {r['steps']} steps)  {mem} {r['peak_mib_batched']:.0f} MiB"
    )
    print(
        f"  per-sample, 77 tokens {r['train_per_sample_samples_per_s']:9.2f} samples/s  "
        f"(best {r['train_per_sample_step_s']:.3f} s/step, median {r['train_per_sample_step_s_median']:.3f}, "
        f"{r['train_per_sample_steps']} steps)  "
        f"{mem} {r['peak_mib_per_sample']:.0f} MiB"
    )
    print(f"  speed-up              {r['train_speedup']:9.2f} x  (FLOP ratio {r['train_flop_ratio']:.2f} x)")
    print(
        f"  FLOPs per step        {r['train_step_gflop']:9.1f} GFLOP batched, {r['train_per_sample_step_gflop']:.1f} GFLOP "
        f"per-sample  ({r['train_batched_tflop_per_s']:.3f} TFLOP/s achieved, batched)"
    )
    if "train_batched_bf16_samples_per_s" in r:
        print(
            f"  batched, bf16 autocast {r['train_batched_bf16_samples_per_s']:8.2f} samples/s  "
            f"peak alloc {r['peak_mib_batched_bf16']:.0f} MiB"
        )
        if "mfu_bf16" in r:
            print(f"  share of GPU peak     bf16 {r['mfu_bf16']:.2%}, fp32/TF32 {r['mfu_fp32_tf32']:.2%}")
    print(f"inference (predict: image encoder + head; best of {r['infer_iters']} interleaved calls):")
    print(f"  cliplung              {r['infer_cliplung_samples_per_s']:9.1f} samples/s")
    print(f"  ce                    {r['infer_ce_samples_per_s']:9.1f} samples/s")
    print(f"  cliplung / ce         {r['infer_ratio']:9.3f}   {mem} {r['peak_mib_inference']:.0f} MiB")
    pressure = [p for p in (r.get("cpu_pressure_start"), r.get("cpu_pressure_end")) if p is not None]
    if r["device"].startswith("cpu") and pressure and max(pressure) > 0.2:
        print(
            f"note: other processes competed for the CPUs (PSI cpu some avg10 up to {max(pressure):.0%}); "
            "timings are unreliable, OMP_NUM_THREADS=1 suffers least. The FLOP ratio is load-independent."
        )
    print("parameters:")
    print(
        f"  total {r['params_total']:,}  trainable {r['params_trainable']:,}  "
        f"inference export {r['params_inference_export']:,}  ce {r['params_ce']:,}"
    )
