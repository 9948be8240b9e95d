"""Training-time augmentation of nodule patches, as batched torch ops with explicit random state.

Augmentation runs on the training worker, on the batch Ray Data hands it, rather than inside a
Ray Data ``map_batches``: on a GPU worker the ops run on the device, and the random state is a
``torch.Generator`` seeded from (run seed, epoch, rank), so a run is reproducible for a seed and a
worker count and a resumed epoch replays exactly the augmentation it had. Validation and test
patches are never augmented.

The random numbers of a batch are drawn in one go on the generator's device (the CPU: the same
stream on a CPU or a GPU worker) as a ``(B, 9)`` table (:func:`draw_augmentation`) and reach the
batch's device in one copy that does not block the host (pinned memory); the transforms then run
on the device with no per-sample Python loop and nothing read back (:func:`apply_augmentation`).

All transforms take a batch ``x`` of shape (B, D, H, W) with intensities in [0, 1] (axis 1 is the
axial slice axis, H and W the in-plane axes) and keep shape and dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cliplung.config import AugmentConfig

__all__ = ["apply_augmentation", "augment_batch", "draw_augmentation", "epoch_generator", "to_device"]

DRAWS_PER_SAMPLE = 9
"""Columns of :func:`draw_augmentation`'s table: 3 flip coins, the rot90 count, 3 shifts (uniform in
[0, 1)), then the intensity scale and offset (standard normal)."""


def epoch_generator(seed: int, epoch: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator whose stream depends only on (seed, epoch, rank)."""
    gen = torch.Generator(device=device)
    # Distinct, stable 63-bit seeds; no Python hash() (salted per process).
    gen.manual_seed((seed * 1_000_003 + epoch * 10_007 + rank * 101 + 12_345) % (2**63 - 1))
    return gen


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without making the host wait: host tensors bound for a GPU are pinned, then
    copied asynchronously (a copy from pageable memory synchronises the stream first)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and torch.cuda.is_available():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def draw_augmentation(batch: int, gen: torch.Generator) -> torch.Tensor:
    """Every random number one batch's augmentation uses: ``(batch, 9)`` float32 on ``gen``'s device.

    All columns are drawn whatever the config, so the stream of later batches does not depend on
    which transforms are on."""
    uniform = torch.rand((batch, 7), generator=gen, device=gen.device)
    normal = torch.randn((batch, 2), generator=gen, device=gen.device)
    return torch.cat([uniform, normal], dim=1)


def _flip(x: torch.Tensor, coins: torch.Tensor) -> torch.Tensor:
    """Flip each sample along spatial axis ``a`` where ``coins[:, a] < 0.5``."""
    for axis in range(3):
        mask = (coins[:, axis] < 0.5).view(-1, 1, 1, 1)
        x = torch.where(mask, x.flip(axis + 1), x)
    return x


def _rot90(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rotate each sample in the axial plane by k·90°, ``k = ⌊4u⌋`` (square slices: cubic patches)."""
    ks = (u * 4).long().clamp_(max=3)
    out = x
    for k in (1, 2, 3):
        mask = (ks == k).view(-1, 1, 1, 1)
        out = torch.where(mask, torch.rot90(x, k, dims=(2, 3)), out)
    return out


def _shift(x: torch.Tensor, u: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift each sample by ``⌊(2s+1)u⌋ − s`` voxels per axis (reflect padding, then one gather that
    crops every sample at its own offset)."""
    b, d, h, w = x.shape
    padded = F.pad(x.unsqueeze(1), (max_shift,) * 6, mode="reflect").squeeze(1)
    offsets = (u * (2 * max_shift + 1)).long().clamp_(max=2 * max_shift)  # (B, 3) crop starts
    dev = x.device
    z = (offsets[:, 0:1] + torch.arange(d, device=dev)).view(b, d, 1, 1)
    y = (offsets[:, 1:2] + torch.arange(h, device=dev)).view(b, 1, h, 1)
    xx = (offsets[:, 2:3] + torch.arange(w, device=dev)).view(b, 1, 1, w)
    return padded[torch.arange(b, device=dev).view(b, 1, 1, 1), z, y, xx]


def _intensity(x: torch.Tensor, normal: torch.Tensor, std: float) -> torch.Tensor:
    """``x * (1 + a) + b`` with ``a, b ~ N(0, std)`` per sample, clamped back to [0, 1]."""
    ab = normal.to(x.dtype) * std
    return (x * (1 + ab[:, 0].view(-1, 1, 1, 1)) + ab[:, 1].view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def apply_augmentation(x: torch.Tensor, draws: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """The configured transforms in a fixed order (flip, rot90, shift, intensity), driven by ``draws``
    (:func:`draw_augmentation`, on ``x``'s device)."""
    if cfg.flip:
        x = _flip(x, draws[:, 0:3])
    if cfg.rot90:
        x = _rot90(x, draws[:, 3])
    if cfg.max_shift > 0:
        x = _shift(x, draws[:, 4:7], cfg.max_shift)
    if cfg.intensity_jitter > 0:
        x = _intensity(x, draws[:, 7:9], cfg.intensity_jitter)
    return x


def augment_batch(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Draw this batch's random numbers from ``gen``, move them to ``x``'s device, augment ``x``."""
    return apply_augmentation(x, to_device(draw_augmentation(x.shape[0], gen), x.device), cfg)
