"""``cliplung inspect STORE [--verify] [--png FILE]``: what is in a nodule store, as text and a picture.

The text names the live version, lists the arrays (shape, dtype, chunking), the group attributes,
the class counts per fold and the result of :meth:`~cliplung.data.store.NoduleStore.validate`:
opening already checked that every object of the completion marker's manifest is there with its
size; ``--verify`` also re-reads every object and checks its SHA-256. The PNG is a montage of the
middle axial slice of a few patches per class, to eyeball centring, windowing and class mix.
"""

from __future__ import annotations

import json
import time

import numpy as np

from cliplung.data.store import CLASS_NAMES, NoduleStore, StoreError

__all__ = ["inspect_store"]

SAMPLES_PER_CLASS = 6


def inspect_store(
    path: str, png_out: str | None = None, endpoint: str | None = None, *, verify: bool = False
) -> tuple[str, bool]:
    """A human-readable description of the store at ``path`` and whether it validated; writes a
    montage to ``png_out``. ``verify``: check every object's checksum too."""
    store = NoduleStore.open(path, endpoint=endpoint)
    attrs = store.attrs
    size = sum(size for size, _ in store.objects.values())
    lines = [
        f"store {store.path}: {store.num_nodules} nodules, schema version {attrs.get('schema_version')}",
        f"  version {store.version}: {len(store.objects)} objects, {size / 1e6:.1f} MB ({store.root})",
    ]
    if attrs.get("simulated"):
        lines.append(f"  NOTE: {attrs.get('source_note', 'simulated data')}")

    lines += ["", "arrays:"]
    for name in store.fields:
        array = store.array(name)
        shards = getattr(array, "shards", None)
        layout = f"chunks {tuple(array.chunks)}" + (f", shards {tuple(shards)}" if shards else "")
        lines.append(f"  {name:<13} {array.dtype!s:<14} {tuple(array.shape)!s:<22} {layout}")

    lines += ["", "attributes:"]
    for key in sorted(attrs):
        value = attrs[key]
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)
        lines.append(f"  {key}: {text}")

    meta = store.read_rows(0, store.num_nodules, ("label", "fold", "patient_id"))
    labels, folds = meta["label"].astype(int), meta["fold"].astype(int)
    n_folds = int(attrs.get("folds", folds.max(initial=-1) + 1))
    header = ["", *CLASS_NAMES, "total", "patients"]
    rows = []
    for f in range(n_folds):
        sel = folds == f
        rows.append(
            [
                f"fold {f}",
                *(str(int((labels[sel] == c).sum())) for c in range(3)),
                str(int(sel.sum())),
                str(len(np.unique(meta["patient_id"][sel]))),
            ]
        )
    rows.append(
        [
            "all",
            *(str(int((labels == c).sum())) for c in range(3)),
            str(len(labels)),
            str(len(np.unique(meta["patient_id"]))),
        ]
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines += ["", "counts per class and fold:"]
    lines += [
        "  "
        + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [header, *rows]
    ]

    started = time.perf_counter()
    try:
        store.validate(checksums=verify)
        checked = "sizes and SHA-256 of" if verify else "sizes (not checksums: pass --verify) of"
        lines += [
            "",
            f"validate: ok ({checked} {len(store.objects)} objects, array contents; "
            f"{time.perf_counter() - started:.1f} s)",
        ]
        ok = True
    except StoreError as exc:
        lines += ["", f"validate: FAILED: {exc}"]
        ok = False

    if png_out:
        _montage(store, labels, png_out)
        lines.append(f"montage: {png_out}")
    return "\n".join(lines), ok


def _montage(store: NoduleStore, labels: np.ndarray, png_out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(3, SAMPLES_PER_CLASS, figsize=(1.6 * SAMPLES_PER_CLASS, 5.4), squeeze=False)
    for c, name in enumerate(CLASS_NAMES):
        rows = np.flatnonzero(labels == c)
        picked = (
            np.sort(rng.choice(rows, size=min(SAMPLES_PER_CLASS, len(rows)), replace=False))
            if len(rows)
            else []
        )
        patches = (
            store.read(["patches", "nodule_id"], picked) if len(picked) else {"patches": [], "nodule_id": []}
        )
        for s, ax in enumerate(axes[c]):
            ax.set_xticks([])
            ax.set_yticks([])
            if s < len(picked):
                patch = np.asarray(patches["patches"][s], dtype=np.float32)
                ax.imshow(patch[patch.shape[0] // 2], cmap="gray", vmin=0.0, vmax=1.0)
                ax.set_title(str(patches["nodule_id"][s]), fontsize=6)
            if s == 0:
                ax.set_ylabel(f"{name} ({len(rows)})", fontsize=8)
    # The store's name, not its path: a figure is shared, and a path says who made it where.
    title = f"{store.path.rstrip('/').rsplit('/', 1)[-1]} ({store.attrs.get('source')})"
    if store.attrs.get("simulated"):
        title += ": simulated intensities, not LIDC images"
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(png_out, dpi=100)
    plt.close(fig)
