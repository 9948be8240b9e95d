"""``cliplung predict``: malignancy probabilities for one nodule of a CT series, or for a whole store.

::

    # one nodule: patient-space centre in mm (x, y, z), as DICOM's ImagePositionPatient
    cliplung predict --checkpoint runs/debug/epoch_0001/model.pt --dicom-dir SERIES_DIR --center -61.5,-150.2,-122.5
    # ... or in voxels: x = column, y = row of the stored images, z = slice index in ascending z
    cliplung predict --checkpoint model.pt --dicom-dir SERIES_DIR --center 256,301,87 --units voxel
    # every nodule of a store, with Ray Data (offline batch inference)
    cliplung predict --checkpoint model.pt --data stores/phantom --out predictions.parquet

**One nodule** (:func:`predict_dicom`): the folder must hold one series
(:func:`cliplung.data.dicom.find_single_series`); it is read by
:func:`cliplung.data.dicom.read_axial_series`, the reader and geometry rule ``cliplung prepare``
uses for LIDC (refusing non-axial or non-CT series, missing slices, a zero or non-finite rescale,
and the rest; feet-first series flipped into patient axes), and the patch is cut by
:func:`cliplung.data.dicom.extract_patch` with the patch size, spacing and HU window of the
checkpoint's ``prepare`` config (a non-finite or single-valued patch is refused). The patch is
rounded to float16 as the store keeps it, so a nodule scores exactly as it would from a store.
A centre outside the volume is refused.

Data that was prepared otherwise than the checkpoint's ``prepare`` section (patch size, spacing, HU
window) is refused by :func:`cliplung.data.preprocessing.check_preprocessing`, for a store and for a
DICOM cut alike.

**A store** (:func:`predict_store`): a Ray Data pipeline, :class:`~cliplung.data.ingest.NoduleDatasource`
read tasks → ``map_batches`` with a callable class (each actor loads the model once) → one Parquet
file with a row per nodule: ``row``, ``nodule_id``, ``patient_id``, ``fold``, ``label`` (the store's
0 benign / 1 unsure / 2 malignant), ``label_name``, ``predicted``, ``probabilities`` (list, in the
model's class order) and one ``p_<class>`` column per class. A 2-class model scores unsure nodules
too (their ``label`` says so). The model's class names, task and checkpoint are in the file's
schema metadata.

Only the inference export (image encoder + head) is ever loaded, never a text tower.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cliplung.config import PrepareConfig
from cliplung.data.dicom import CTVolume, extract_patch, find_single_series, read_axial_series
from cliplung.data.preprocessing import check_preprocessing, preprocessing_of, store_preprocessing
from cliplung.data.store import NoduleStore
from cliplung.evaluate.checkpoints import open_checkpoint
from cliplung.evaluate.evaluate import predict_probabilities
from cliplung.labels import CLASS_NAMES

__all__ = [
    "PredictError",
    "StorePredictor",
    "dicom_patch",
    "parse_center",
    "predict_dicom",
    "predict_store",
    "voxel_center",
]

STORE_LABELS = CLASS_NAMES


class PredictError(ValueError):
    """A prediction request cannot be served as asked (e.g. a centre outside the scan)."""


def parse_center(text: str) -> tuple[float, float, float]:
    """``"X,Y,Z"`` → three floats."""
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(np.isfinite(values)):
        raise PredictError(f"--center: expected X,Y,Z (three numbers), got {text!r}")
    return values  # type: ignore[return-value]


def voxel_center(volume: CTVolume, center: Sequence[float], units: str = "mm") -> np.ndarray:
    """``center`` (x, y, z) in patient-space mm or in voxels → voxel (z, y, x) of ``volume``.

    Voxels are (column, row) of the stored images and the slice index in ascending z, the
    convention of pylidc's annotations and of a store's ``centroid_vox``, whatever way the series
    was flipped into patient axes. Raises :class:`PredictError` when the centre lies outside the
    volume (the same bound ``cliplung prepare`` applies to LIDC nodule centres).
    """
    if units not in ("mm", "voxel"):
        raise PredictError(f"--units: must be 'mm' or 'voxel', got {units!r}")
    x, y, z = (float(v) for v in center)
    zyx = volume.world_to_voxel((x, y, z)) if units == "mm" else volume.grid_to_voxel((z, y, x))
    shape = volume.shape
    inside = all(0.0 <= c <= n - 1 for c, n in zip(zyx, shape, strict=True))
    if not inside:
        corner = np.asarray(volume.origin)
        far = corner + volume.direction @ (
            np.array([shape[2] - 1, shape[1] - 1, shape[0] - 1])
            * np.array([volume.spacing[2], volume.spacing[1], volume.spacing[0]])
        )
        raise PredictError(
            f"--center {x:g},{y:g},{z:g} ({units}) lies outside the series: voxel (x={zyx[2]:.1f}, "
            f"y={zyx[1]:.1f}, z={zyx[0]:.1f}) of a {shape[2]}x{shape[1]}x{shape[0]} volume "
            f"(x, y, z in mm from {np.round(corner, 1).tolist()} to {np.round(far, 1).tolist()})"
        )
    return zyx


def dicom_patch(
    dicom_dir: str | os.PathLike, center: Sequence[float] | str, prepare: PrepareConfig, units: str = "mm"
) -> tuple[np.ndarray, dict[str, Any]]:
    """The patch ``cliplung prepare`` would cut around ``center`` of the series in ``dicom_dir``.

    Returns the float32 patch, rounded to float16 as the store keeps it (so it is bit-identical to a
    stored one), and where it came from (series UID, slices, voxel centre, the preprocessing used).
    """
    if isinstance(center, str):
        center = parse_center(center)
    if units not in ("mm", "voxel"):
        raise PredictError(f"--units: must be 'mm' or 'voxel', got {units!r}")
    name = str(dicom_dir)
    uid, files = find_single_series(dicom_dir, scan=name)
    volume = read_axial_series(dicom_dir, uid, files=files, scan=name)
    zyx = voxel_center(volume, center, units)
    patch = extract_patch(volume, zyx, prepare.patch_size, prepare.spacing_mm, prepare.hu_window, scan=name)
    patch = patch.astype(np.float16).astype(np.float32)
    return patch, {
        "series_uid": uid,
        "slices": int(volume.shape[0]),
        "center": [float(v) for v in center],
        "units": units,
        "center_voxel_zyx": [round(float(v), 3) for v in zyx],
        **preprocessing_of(prepare),
        "patch_shape": list(patch.shape),
    }


def predict_dicom(
    checkpoint: str | Path, dicom_dir: str | os.PathLike, center: Sequence[float] | str, units: str = "mm"
) -> dict[str, Any]:
    """Class probabilities of the nodule at ``center`` of the CT series in ``dicom_dir``.

    ``center``: (x, y, z) in patient-space mm (``units="mm"``) or voxels (``"voxel"``: column, row,
    slice index), or the text ``"X,Y,Z"``. Returns a JSON-ready dict with ``probabilities`` (class
    name → probability, summing to 1), ``predicted``, the voxel centre and the preprocessing used.
    """
    if isinstance(center, str):
        center = parse_center(center)
    if units not in ("mm", "voxel"):
        raise PredictError(f"--units: must be 'mm' or 'voxel', got {units!r}")
    model, config, choice = open_checkpoint(checkpoint)
    patch, source = dicom_patch(dicom_dir, center, config.prepare, units)
    check_preprocessing(
        {**source, "patch_size": patch.shape[0]},
        config.prepare,
        source=f"the patch cut from {dicom_dir}",
        checkpoint=choice.model_path,
    )
    probs = predict_probabilities(model, patch[None])[0]
    names = config.data.class_names
    source.pop("patch_shape")
    return {
        "checkpoint": choice.model_path,
        **source,
        "task": config.data.task,
        "class_names": list(names),
        "probabilities": {name: float(v) for name, v in zip(names, probs, strict=True)},
        "predicted": names[int(probs.argmax())],
    }


# --------------------------------------------------------------------------- a whole store


class StorePredictor:
    """Ray Data callable class: holds the inference model, maps a batch of patches to probabilities.

    ``payload`` is a one-element list holding an object ref to :func:`cliplung.model.inference_payload`
    output (wrapped in a list so Ray passes the ref itself and the actor fetches it once).
    """

    def __init__(self, payload: list, device: str = "cpu", threads: int | None = None) -> None:
        import ray
        import torch

        from cliplung.model.export import load_inference

        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.model, _ = load_inference(ray.get(payload[0]), map_location=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        probs = predict_probabilities(
            self.model, batch["patches"], batch_size=len(batch["patches"]), device=self.device
        )
        return {"index": np.asarray(batch["index"], dtype=np.int64), "probabilities": probs}


def _ensure_ray(address: str | None) -> bool:
    """Join ``address`` (or ``RAY_ADDRESS``), or start an embedded Ray; True when this call started
    one (the caller then shuts it down: a dashboard-less embedded Ray left running would be reused by
    a later ``train`` in the same process, which needs the dashboard)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return False
    ray.init(address="local", include_dashboard=False, configure_logging=False)
    return True


def _score_with_ray_data(
    store: NoduleStore,
    names: Sequence[str],
    endpoint: str | None,
    model,
    config,
    batch_size: int,
    concurrency: int,
    cpus_per_actor: int,
    num_gpus: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(store rows, probabilities) of every nodule, in completion order."""
    import ray
    import ray.data

    from cliplung.data.ingest import NoduleDatasource
    from cliplung.model.export import inference_payload

    payload_ref = ray.put(inference_payload(model, config))
    n = store.num_nodules
    # task="3class" keeps the store's labels untouched; the model decides its own classes.
    ds = ray.data.read_datasource(
        NoduleDatasource(store.path, np.arange(n), endpoint=endpoint, task="3class")
    )
    ds = ds.map_batches(
        StorePredictor,
        fn_constructor_kwargs={
            "payload": [payload_ref],
            "device": "cuda" if num_gpus else "cpu",
            "threads": cpus_per_actor,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cpus_per_actor,
        num_gpus=num_gpus,
    )
    index_parts, prob_parts = [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        index_parts.append(batch["index"])
        prob_parts.append(np.asarray(batch["probabilities"], dtype=np.float64))
    index = np.concatenate(index_parts) if index_parts else np.zeros(0, dtype=np.int64)
    probs = np.concatenate(prob_parts) if prob_parts else np.zeros((0, len(names)))
    return index, probs


def predict_store(
    checkpoint: str | Path,
    store: str | NoduleStore,
    out_parquet: str,
    address: str | None = None,
    *,
    endpoint: str | None = None,
    batch_size: int = 64,
    concurrency: int = 1,
    cpus_per_actor: int = 1,
    num_gpus: float = 0.0,
) -> dict[str, Any]:
    """Score every nodule of ``store`` with Ray Data and write ``out_parquet`` (local or ``s3://``).

    ``concurrency`` model actors (``cpus_per_actor`` CPUs and torch threads each, plus ``num_gpus``)
    run ``map_batches`` over ``batch_size``-row batches. Returns a summary (rows, seconds, patches/s, output path).
    """
    import pyarrow as pa

    from cliplung import storage as storage_lib

    model, config, choice = open_checkpoint(checkpoint, endpoint=endpoint)
    if not isinstance(store, NoduleStore):
        store = NoduleStore.open(str(store), endpoint=endpoint)
    check_preprocessing(
        store_preprocessing(store), config.prepare, source=f"store {store.path}", checkpoint=choice.model_path
    )
    if not str(out_parquet).endswith(".parquet"):
        raise PredictError(f"--out: expected a .parquet file name, got {out_parquet!r}")
    names = config.data.class_names
    n = store.num_nodules
    ray_start = time.perf_counter()
    started = _ensure_ray(address)
    start = time.perf_counter()
    try:
        index, probs = _score_with_ray_data(
            store, names, endpoint, model, config, batch_size, concurrency, cpus_per_actor, num_gpus
        )
    finally:
        if started:
            import ray

            ray.shutdown()
    seconds = time.perf_counter() - start
    order = np.argsort(index, kind="stable")
    index, probs = index[order], probs[order]
    if not np.array_equal(index, np.arange(n)):
        raise RuntimeError(f"predict: scored {len(index)} distinct rows of {n} in {store.path}")

    meta = store.read(("nodule_id", "patient_id", "fold", "label"), indices=index)
    labels = meta["label"].astype(np.int8)
    columns = {
        "row": pa.array(index),
        "nodule_id": pa.array(meta["nodule_id"].tolist(), pa.string()),
        "patient_id": pa.array(meta["patient_id"].tolist(), pa.string()),
        "fold": pa.array(meta["fold"].astype(np.int8)),
        "label": pa.array(labels),
        "label_name": pa.array([STORE_LABELS[v] for v in labels.tolist()], pa.string()),
        "predicted": pa.array([names[int(i)] for i in probs.argmax(axis=1)] if n else [], pa.string()),
        "probabilities": pa.array(probs.tolist(), pa.list_(pa.float64())),
        **{f"p_{name}": pa.array(probs[:, c]) for c, name in enumerate(names)},
    }
    table = pa.table(columns).replace_schema_metadata(
        {
            "cliplung": json.dumps(
                {
                    "checkpoint": choice.model_path,
                    "store": store.path,
                    "task": config.data.task,
                    "class_names": list(names),
                    "store_labels": list(STORE_LABELS),
                }
            )
        }
    )
    _write_parquet(table, str(out_parquet), endpoint, storage_lib)
    return {
        "out": str(out_parquet),
        "rows": int(n),
        "seconds": round(seconds, 3),
        "ray_start_seconds": round(start - ray_start, 3),
        "patches_per_s": round(n / seconds, 1) if seconds > 0 else None,
        "class_names": list(names),
        "checkpoint": choice.model_path,
    }


def _write_parquet(table, out: str, endpoint: str | None, storage_lib) -> None:
    import pyarrow.parquet as pq

    if storage_lib.is_s3(out):
        fs, path = storage_lib.pyarrow_filesystem(out, endpoint=endpoint)
        pq.write_table(table, path, filesystem=fs)
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)  # a crash never leaves a half-written file under the final name
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
