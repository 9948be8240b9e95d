"""cliplung prepare keeps going and never damages what it finds: output paths it may not use, any
failure of one scan (an exception, non-finite voxels, a worker killed like the OOM killer does),
resume after a kill, the same bytes from every executor (serial, processes, Ray tasks, a real
two-node cluster through `ray job submit`), quickstart that never replaces anything."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr
from dicom_fixtures import LIDC_FIXTURE_SCANS, write_lidc_scan

from cliplung import cli, storage
from cliplung.config import load_config
from cliplung.data import prepare as prepare_mod
from cliplung.data.dicom import DicomError
from cliplung.data.phantom import phantom_scan_rows
from cliplung.data.prepare import PrepareError, prepare_store
from cliplung.data.store import BUILDS, COMPLETION_MARKER, POINTER, NoduleStore, StoreError

REPO = Path(__file__).resolve().parents[1]
LIMIT = 4  # phantom scans LIDC-IDRI-0001..0004: 11 nodules


def _phantom(*extra: str, limit: int = LIMIT):
    return load_config("debug", [f"prepare.limit={limit}", "prepare.folds=2", *extra])


def _array_objects(out) -> dict[str, list]:
    """Sizes and SHA-256 of every array object of the live version (the group attributes and
    config.yaml also hold the creation time and worker count)."""
    store = NoduleStore.open(str(out))
    return {k: v for k, v in store.objects.items() if k not in ("zarr.json", "config.yaml")}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return env | {"PYTHONPATH": str(REPO), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


# --------------------------------------------------------------------------- where a store may go


def test_out_must_stay_clear_of_the_dicom_folder(tmp_path, capsys):
    lidc = tmp_path / "LIDC-IDRI"
    (lidc / "LIDC-IDRI-0001").mkdir(parents=True)
    (lidc / "LIDC-IDRI-0001" / "1.dcm").write_bytes(b"precious")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out, relation in ((lidc, "is"), (lidc / "stores" / "s", "lies inside"), (tmp_path, "contains")):
        code = cli.main(["prepare", "--source", "lidc", "--lidc-dir", str(lidc), "--out", str(out)])
        assert code == 2
        assert f"--out {out} {relation} --lidc-dir {lidc}" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_bucket_root_is_refused(capsys):
    assert cli.main(["prepare", "--out", "s3://some-bucket"]) == 2
    assert "s3://some-bucket: a bucket root cannot be a nodule store" in capsys.readouterr().err


def test_prepare_refuses_a_folder_that_is_not_a_store_even_with_overwrite(tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "table.csv").write_text("a,b\n")
    assert cli.main(["prepare", "--out", str(folder), "--limit", "1", "--overwrite"]) == 2
    assert f"{folder} holds 'table.csv', which is not part of a nodule store" in capsys.readouterr().err
    assert os.listdir(folder) == ["table.csv"]


def test_quickstart_never_replaces_anything(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    code = cli.main(["quickstart", "--store", str(folder), "--storage", str(tmp_path / "runs")])
    assert code == 2
    assert f"{folder} is not a nodule store (it holds 'notes.txt')" in capsys.readouterr().err
    assert os.listdir(folder) == ["notes.txt"] and not (tmp_path / "runs").exists()

    # A store of the old layout is ours, but quickstart does not rebuild it either: it says how.
    old = tmp_path / "old"
    group = zarr.open_group(str(old), mode="w", zarr_format=3)
    group.attrs.update({"schema_version": 1, "completion_marker": COMPLETION_MARKER})
    (old / COMPLETION_MARKER).write_text("{}\n")
    code = cli.main(["quickstart", "--store", str(old), "--storage", str(tmp_path / "runs")])
    assert code == 2
    assert "schema version 1" in capsys.readouterr().err and (old / COMPLETION_MARKER).exists()


# --------------------------------------------------------------------------- one scan, one failure


def _rewrite_all(files: list[Path], **changes) -> None:
    import pydicom
    from pydicom import config as dicom_config

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dicom_config.settings, "writing_validation_mode", dicom_config.IGNORE)
        for path in files:
            ds = pydicom.dcmread(path)
            for key, value in changes.items():
                setattr(ds, key, value)
            ds.save_as(path)


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory):
    """A good scan plus three that break in ways the DICOM reader does not anticipate."""
    root = tmp_path_factory.mktemp("odd")
    write_lidc_scan(root, LIDC_FIXTURE_SCANS[0])
    huge = write_lidc_scan(root, "LIDC-IDRI-0079", in_plane=16)
    _rewrite_all(huge, Rows=60000, Columns=60000)  # 7.2 GB declared, 512 bytes present
    nan = write_lidc_scan(root, "LIDC-IDRI-0115", in_plane=16)
    _rewrite_all([f for f in nan if f.name == "1-0050.dcm"], RescaleSlope="NaN")
    text = write_lidc_scan(root, "LIDC-IDRI-0110", in_plane=16)
    target = next(f for f in text if f.name == "1-0050.dcm")
    _rewrite_all([target], RescaleSlope="9.876543")
    data = target.read_bytes()
    assert data.count(b"9.876543") == 1
    target.write_bytes(data.replace(b"9.876543", b"9.87654x"))  # pydicom refuses to write that itself
    return root


ODD = {
    "LIDC-IDRI-0079": r"1-0113\.dcm: pixel data unreadable or truncated",
    "LIDC-IDRI-0115": r"file .*1-0050\.dcm: RescaleSlope is nan, expected a finite number",
    "LIDC-IDRI-0110": r"1-0050\.dcm: RescaleSlope is not a number \('9\.87654x'\)",
}


def _lidc(root, **prepare):
    overrides = [
        "prepare.source=lidc",
        f"prepare.lidc_dir={root}",
        "prepare.folds=2",
        "prepare.patch_size=16",
    ]
    return load_config("debug", overrides + [f"prepare.{k}={v}" for k, v in prepare.items()])


def test_any_failure_in_one_scan_is_that_scans_error(odd_root, tmp_path):
    summary = prepare_store(_lidc(odd_root), str(tmp_path / "s"), progress=False)
    reasons = {name.split(" ")[0]: reason for name, reason in summary.skipped}
    assert sorted(reasons) == sorted(ODD), summary.format()
    for patient, pattern in ODD.items():
        assert reasons[patient].startswith(f"{patient} [series "), reasons[patient]
        assert re.search(pattern, reasons[patient]), reasons[patient]
    assert summary.scans_read == 1 and NoduleStore.open(str(tmp_path / "s")).num_nodules == 4

    root = tmp_path / "one"
    shutil.copytree(odd_root / "LIDC-IDRI-0079", root / "LIDC-IDRI-0079")
    with pytest.raises(DicomError, match=ODD["LIDC-IDRI-0079"]):
        prepare_store(_lidc(root, on_error="fail"), str(tmp_path / "f"), progress=False)
    assert not (tmp_path / "f").exists()


def test_an_unexpected_error_in_one_scan_is_that_scans_error(odd_root, tmp_path, monkeypatch):
    """An exception the reader does not anticipate (a bug, a library's own error) skips that scan
    with its name and the exception type; the other scans are kept."""
    from cliplung.data import lidc

    def broken_patch(*args, **kwargs):
        raise RuntimeError("something nobody anticipated")

    monkeypatch.setattr(lidc, "extract_patch", broken_patch)  # this process only: serial executor
    root = tmp_path / "one"
    shutil.copytree(odd_root / LIDC_FIXTURE_SCANS[0], root / LIDC_FIXTURE_SCANS[0])
    pattern = r"reading the series in .* failed: RuntimeError: something nobody anticipated"
    with pytest.raises(DicomError, match=pattern):
        prepare_store(
            _lidc(root, workers=1, on_error="fail"), str(tmp_path / "f"), progress=False, executor="serial"
        )
    with pytest.raises(
        PrepareError, match=r"no nodules extracted from 1 scans \(1 skipped, e\.g\. .*" + pattern
    ):
        prepare_store(
            _lidc(root, workers=1, on_error="skip"), str(tmp_path / "k"), progress=False, executor="serial"
        )
    assert not (tmp_path / "f").exists() and not (tmp_path / "k").exists()


def killing_scan_rows(scan_id: int, config, victim: int):
    """The phantom renderer, except that reading ``victim`` kills the process (as the OOM killer
    does: SIGKILL, no cleanup, no exception)."""
    if scan_id == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    return phantom_scan_rows(scan_id, config)


@pytest.mark.slow  # spawns worker processes
@pytest.mark.timeout(300)
@pytest.mark.parametrize("noticed", ["at-once", "at-next-submit"])
def test_a_worker_killed_by_the_oom_killer_is_that_scans_failure(tmp_path, monkeypatch, noticed):
    """``at-next-submit``: the driver is slow to come back from waiting (1 s), so the pool breaks
    between a finished scan and the next submit, which then raises (that used to end the prepare
    with ``BrokenProcessPool``, a failure seen in the suite)."""
    if noticed == "at-next-submit":
        import concurrent.futures

        real_wait = concurrent.futures.wait

        def slow_wait(*args, **kwargs):
            result = real_wait(*args, **kwargs)
            time.sleep(1.0)
            return result

        monkeypatch.setattr(concurrent.futures, "wait", slow_wait)
    config = _phantom("prepare.workers=2", limit=5)
    scans, _ = prepare_mod._work(config)
    victim = scans[2]
    clean = prepare_store(_phantom(limit=5), str(tmp_path / "clean"), progress=False, executor="serial")
    real_work = prepare_mod._work

    def work(cfg):
        items, _ = real_work(cfg)
        return items, functools.partial(killing_scan_rows, config=cfg.prepare, victim=victim)

    monkeypatch.setattr(prepare_mod, "_work", work)
    started = time.monotonic()
    summary = prepare_store(config, str(tmp_path / "s"), progress=False, executor="processes")
    print(f"5 scans, one worker killed: {time.monotonic() - started:.1f} s")
    ((name, reason),) = summary.skipped
    assert name == f"pylidc scan {victim}"
    assert reason == (
        f"pylidc scan {victim}: the worker process reading it was killed by signal 9 (SIGKILL), "
        "as the kernel's out-of-memory killer does"
    )
    assert summary.scans_read + summary.scans_without_nodules == 4
    assert summary.nodules < clean.nodules

    with pytest.raises(
        PrepareError, match=rf"pylidc scan {victim}: the worker process reading it was killed"
    ):
        prepare_store(
            load_config(
                "debug", ["prepare.limit=5", "prepare.folds=2", "prepare.on_error=fail", "prepare.workers=2"]
            ),
            str(tmp_path / "f"),
            progress=False,
            executor="processes",
        )


# --------------------------------------------------------------------------- resume


def _scans_kept(out: Path) -> list[Path]:
    return sorted((out / BUILDS).glob("*/scans/*.npz"))


@pytest.mark.slow  # runs and kills a prepare process
@pytest.mark.timeout(300)
def test_a_killed_prepare_resumes_where_it_stopped_and_gives_the_same_bytes(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["prepare", "--limit", "6", "--folds", "2", "--out", str(out), "--workers", "1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "cliplung.cli", *args],
        env=_env(),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 200
    while len(_scans_kept(out)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    kept = len(_scans_kept(out))
    assert 2 <= kept < 6, process.stderr.read()
    assert not (out / POINTER).exists()

    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert (
        f"holds an unfinished build of these arguments ({kept} of 6 scans done" in err and "--resume" in err
    )
    with pytest.raises(StoreError, match=r"only an unfinished build: rerun .* with --resume"):
        NoduleStore.open(str(out))

    assert cli.main([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"resumed  {kept} scans kept by the interrupted build" in printed
    assert sorted(os.listdir(out)) == [POINTER, NoduleStore.open(str(out)).version]  # build and partial gone

    clean = tmp_path / "clean"
    prepare_store(_phantom(limit=6), str(clean), progress=False, executor="serial")
    assert _array_objects(out) == _array_objects(clean)


def test_resume_after_a_failed_commit_only_commits(tmp_path, monkeypatch):
    out = tmp_path / "s"
    prepare_store(_phantom(limit=2), str(out), progress=False, executor="serial")
    old = NoduleStore.open(str(out)).version

    def refused(*args, **kwargs):
        raise PermissionError("access denied (injected)")

    monkeypatch.setattr(storage, "replace_if", refused)
    with pytest.raises(StoreError, match=rf"injected.*kept at {out}/v-.*still serves {old}.*--resume"):
        prepare_store(_phantom(limit=2), str(out), overwrite=True, progress=False, executor="serial")
    monkeypatch.undo()
    assert NoduleStore.open(str(out)).version == old

    calls = []
    monkeypatch.setattr(prepare_mod, "_run_scan", lambda *a, **k: calls.append(a))
    summary = prepare_store(_phantom(limit=2), str(out), overwrite=True, resume=True, progress=False)
    assert not calls and "committed the finished version" in summary.format()
    assert NoduleStore.open(str(out)).version == summary.version != old
    assert not (out / BUILDS).exists()


@pytest.mark.slow  # a server
def test_resume_on_s3_continues_from_the_kept_scans(s3_server, tmp_path, monkeypatch):
    from s3server import BUCKET

    url = f"s3://{BUCKET}/resume-{tmp_path.name}/s"
    real = prepare_mod._consume
    seen = []

    def interrupted(block, *args):
        seen.append(block.index)
        if len(seen) == 3:
            raise KeyboardInterrupt
        real(block, *args)

    monkeypatch.setattr(prepare_mod, "_consume", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_store(_phantom(), url, endpoint=s3_server.url, progress=False, executor="serial")
    monkeypatch.undo()
    kept = [
        k for k in s3_server.keys(f"resume-{tmp_path.name}/s/") if f"/{BUILDS}/" in k and k.endswith(".npz")
    ]
    assert len(kept) == 3
    summary = prepare_store(
        _phantom(), url, endpoint=s3_server.url, resume=True, progress=False, executor="serial"
    )
    assert summary.resumed_scans == 3
    assert not [k for k in s3_server.keys(f"resume-{tmp_path.name}/s/") if f"/{BUILDS}/" in k]
    prepare_store(_phantom(), str(tmp_path / "local"), progress=False, executor="serial")
    local = _array_objects(tmp_path / "local")
    assert {
        k: v for k, v in NoduleStore.open(url, endpoint=s3_server.url).objects.items() if k in local
    } == local


# --------------------------------------------------------------------------- executors


@pytest.mark.slow  # processes and Ray tasks
@pytest.mark.timeout(600)
def test_every_executor_and_worker_count_gives_the_same_bytes(tmp_path, ray_session):
    outs = {}
    for name, executor, workers in (
        ("serial", "serial", 1),
        ("processes", "processes", 2),
        ("ray", "ray", 1),
    ):
        outs[name] = tmp_path / name
        summary = prepare_store(
            _phantom(f"prepare.workers={workers}"), str(outs[name]), progress=False, executor=executor
        )
        assert summary.executor.startswith(executor)
        if executor == "ray":
            assert len(summary.nodes) == 1 and sum(summary.nodes.values()) == LIMIT
    reference = _array_objects(outs["serial"])
    assert len(reference) > 20
    for name in ("processes", "ray"):
        assert _array_objects(outs[name]) == reference, name
