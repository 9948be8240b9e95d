"""Training-time augmentation of nodule patches, as batched torch ops with explicit random state.

Augmentation runs on the training worker, on the batch Ray Data hands it, rather than inside a
Ray Data ``map_batches``: on a GPU worker the ops run on the device, and the random state is a
``torch.Generator`` seeded from (run seed, epoch, rank), so a run is reproducible for a seed and a
worker count and a resumed epoch replays exactly the augmentation it had. Validation and test
patches are never augmented.

All transforms take a batch ``x`` of shape (B, D, H, W) with intensities in [0, 1] (axis 1 is the
axial slice axis, H and W the in-plane axes) and keep shape and dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cliplung.config import AugmentConfig

__all__ = ["augment_batch", "epoch_generator"]


def epoch_generator(seed: int, epoch: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator whose stream depends only on (seed, epoch, rank)."""
    gen = torch.Generator(device=device)
    # Distinct, stable 63-bit seeds; no Python hash() (salted per process).
    gen.manual_seed((seed * 1_000_003 + epoch * 10_007 + rank * 101 + 12_345) % (2**63 - 1))
    return gen


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip each sample independently along each of the three spatial axes with p = 0.5."""
    flips = torch.rand((x.shape[0], 3), generator=gen, device=gen.device) < 0.5
    flips = flips.to(x.device)
    for axis in range(3):
        mask = flips[:, axis].view(-1, 1, 1, 1)
        x = torch.where(mask, x.flip(axis + 1), x)
    return x


def random_rot90(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rotate each sample in the axial plane by k * 90 degrees, k uniform in {0, 1, 2, 3}.

    Needs square slices (H == W), which the nodule store guarantees (cubic patches).
    """
    ks = torch.randint(0, 4, (x.shape[0],), generator=gen, device=gen.device).to(x.device)
    out = x
    for k in (1, 2, 3):
        mask = (ks == k).view(-1, 1, 1, 1)
        out = torch.where(mask, torch.rot90(x, k, dims=(2, 3)), out)
    return out


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Shift each sample by up to ``max_shift`` voxels per axis (reflect padding, then crop)."""
    if max_shift <= 0:
        return x
    b, d, h, w = x.shape
    padded = F.pad(x.unsqueeze(1), (max_shift,) * 6, mode="reflect").squeeze(1)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 3), generator=gen, device=gen.device).tolist()
    return torch.stack(
        [padded[i, oz : oz + d, oy : oy + h, ox : ox + w] for i, (oz, oy, ox) in enumerate(offsets)]
    )


def random_intensity(x: torch.Tensor, gen: torch.Generator, std: float) -> torch.Tensor:
    """``x * (1 + a) + b`` with a, b ~ N(0, std) per sample, clamped back to [0, 1]."""
    if std <= 0:
        return x
    ab = torch.randn((x.shape[0], 2), generator=gen, device=gen.device).to(x.device, x.dtype) * std
    return (x * (1 + ab[:, 0].view(-1, 1, 1, 1)) + ab[:, 1].view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def augment_batch(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Apply the configured augmentations in a fixed order (flip, rot90, shift, intensity)."""
    if cfg.flip:
        x = random_flip(x, gen)
    if cfg.rot90:
        x = random_rot90(x, gen)
    x = random_shift(x, gen, cfg.max_shift)
    return random_intensity(x, gen, cfg.intensity_jitter)
