"""A small synthetic nodule store for training tests: classes are separable by blob size and
brightness, every patient has 2 nodules, folds are patient-level."""

from __future__ import annotations

import numpy as np

from cliplung.data.store import write_store


def make_synthetic_store(
    path: str,
    *,
    n_patients: int = 40,
    patch: int = 16,
    folds: int = 5,
    seed: int = 0,
    endpoint: str | None = None,
):
    rng = np.random.default_rng(seed)
    n = n_patients * 2
    labels = np.arange(n) % 3
    rng.shuffle(labels)
    zz, yy, xx = np.meshgrid(*([np.arange(patch) - patch / 2 + 0.5] * 3), indexing="ij")
    r = np.sqrt(zz**2 + yy**2 + xx**2)
    patches = np.empty((n, patch, patch, patch), dtype=np.float32)
    for i, lab in enumerate(labels):
        radius = patch * (0.12 + 0.1 * lab)
        blob = (r < radius).astype(np.float32) * (0.45 + 0.2 * lab)
        patches[i] = np.clip(0.1 + blob + rng.normal(0, 0.03, r.shape), 0, 1)
    malignancy = np.array([2.0, 3.0, 4.0])[labels]
    attributes = np.tile(np.array([3, 1, 6, 3, 3, 2, 2, 4], dtype=np.float32), (n, 1))
    attributes[:, 6] = 1 + 2 * labels  # spiculation tracks malignancy
    patient = np.repeat(np.arange(n_patients), 2)
    fold = (patient % folds).astype(np.int8)
    return write_store(
        path,
        patches,
        fold=fold,
        attrs={"source": "synthetic", "patch_size": patch, "spacing_mm": 1.0, "hu_window": [-1000.0, 400.0]},
        endpoint=endpoint,
        label=labels.astype(np.int8),
        malignancy=malignancy.astype(np.float32),
        attributes=attributes,
        n_readers=np.full(n, 4, dtype=np.int8),
        diameter_mm=(4 + 4 * labels).astype(np.float32),
        centroid_vox=np.zeros((n, 3), dtype=np.float32),
        patient_id=[f"SYN-{p:04d}" for p in patient],
        nodule_id=[f"SYN-{p:04d}/n{i % 2}" for i, p in enumerate(patient)],
        series_uid=[f"1.2.3.{p}" for p in patient],
    )
