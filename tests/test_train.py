"""Training on Ray: fast checks of the pieces, then real runs (marked slow) on an embedded Ray with
2 CPU workers, DeepSpeed on gloo, a synthetic store, local run storage (S3 run storage: tests/test_s3_runs.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import make_synthetic_store

from cliplung import cli
from cliplung.config import AugmentConfig, load_config
from cliplung.data.augment import augment_batch, epoch_generator
from cliplung.data.ingest import compute_splits
from cliplung.data.store import COMPLETION_MARKER, NoduleStore
from cliplung.train.loop import cosine_schedule, deepspeed_config, worker_copy
from cliplung.train.metrics import classification_metrics

BUCKET = "cliplung-runs"


@pytest.fixture(scope="module")
def store(synthetic_store) -> NoduleStore:
    return synthetic_store


def test_workers_of_one_node_resuming_from_remote_storage_read_their_own_copies(tmp_path):
    """Two workers of a node resume from one remote checkpoint: the second's copy never rewrites the
    file the first is reading (Ray's ``Checkpoint.as_directory()`` shares one download folder per node
    and downloads into it again: the truncated ``model.pt`` reads of 2-worker S3 resumes)."""
    import pyarrow.fs
    import ray.train

    payload = np.random.default_rng(0).bytes(4 << 20)
    (tmp_path / "bucket" / "run" / "epoch_0000").mkdir(parents=True)
    (tmp_path / "bucket" / "run" / "epoch_0000" / "model.pt").write_bytes(payload)
    remote = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())
    checkpoint = ray.train.Checkpoint("run/epoch_0000", filesystem=remote)

    with worker_copy(checkpoint, 0) as first:
        before = (first / "model.pt").stat()
        with worker_copy(checkpoint, 1) as second:
            during = (first / "model.pt").stat()  # the first worker's file, while the second copies
            assert (during.st_mtime_ns, during.st_size) == (before.st_mtime_ns, len(payload))
            assert second != first and (second / "model.pt").read_bytes() == payload
        assert (first / "model.pt").read_bytes() == payload
    assert not first.exists() and not second.exists()  # private copies are removed after

    local = ray.train.Checkpoint.from_directory(str(tmp_path / "bucket" / "run" / "epoch_0000"))
    with worker_copy(local, 0) as same:  # a local checkpoint is read in place, never copied
        assert same == tmp_path / "bucket" / "run" / "epoch_0000"
    assert same.exists()


def _config(store_path: str, storage: str, name: str, *extra: str):
    return load_config(
        "debug",
        [
            f"data.store={store_path}",
            f"storage.path={storage}",
            f"name={name}",
            "metrics.enabled=false",
            *extra,
        ],
    )


# --------------------------------------------------------------------------- fast


def test_deepspeed_config_follows_the_training_config():
    cfg = load_config(
        "debug", ["train.batch_size=32", "train.workers=2", "train.grad_accum=2", "train.zero_stage=2"]
    )
    ds = deepspeed_config(cfg, use_gpu=False)
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] * 2 * 2 == 32
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is False and not ds.get("torch_autocast", {}).get("enabled")  # CPU: fp32
    on_gpu = deepspeed_config(cfg, use_gpu=True)
    # bf16 is autocast over fp32 weights: DeepSpeed's bf16 mode (bf16 weights, its own optimizer
    # wrapper) stays off.
    assert on_gpu["torch_autocast"]["enabled"] is True and on_gpu["bf16"]["enabled"] is False


def test_cosine_schedule_warms_up_then_decays_to_zero():
    f = cosine_schedule(total_steps=10, warmup_steps=2)
    values = [f(s) for s in range(11)]
    assert values[0] == pytest.approx(0.5) and values[1] == pytest.approx(1.0)
    assert values[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[2:]))
    assert values[10] == pytest.approx(0.0)


def test_splits_are_patient_level_and_disjoint(store):
    cfg = load_config("debug", [f"data.store={store.path}"])
    s = compute_splits(store, cfg.data)
    meta = store.read(fields=("patient_id", "fold", "label"))
    pid = np.asarray(meta["patient_id"]).astype(str)
    assert (
        set(s.train).isdisjoint(s.val) and set(s.train).isdisjoint(s.test) and set(s.val).isdisjoint(s.test)
    )
    assert len(s.train) + len(s.val) + len(s.test) == store.num_nodules
    assert set(pid[s.train]).isdisjoint(pid[s.val]) and set(pid[s.train]).isdisjoint(pid[s.test])
    assert (np.asarray(meta["fold"])[s.test] == cfg.data.test_fold).all()
    two = compute_splits(store, load_config("debug", ["data.task=2class"]).data)
    labels = np.asarray(meta["label"])
    assert (labels[np.concatenate([two.train, two.val, two.test])] != 1).all()


def test_augmentation_is_seeded_and_keeps_shape():
    x = torch.rand(4, 16, 16, 16)
    cfg = AugmentConfig()
    a = augment_batch(x.clone(), epoch_generator(0, 3, 1), cfg)
    b = augment_batch(x.clone(), epoch_generator(0, 3, 1), cfg)
    c = augment_batch(x.clone(), epoch_generator(0, 4, 1), cfg)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    off = AugmentConfig(flip=False, rot90=False, max_shift=0, intensity_jitter=0.0)
    assert torch.equal(augment_batch(x, epoch_generator(0, 0, 0), off), x)


def test_classification_metrics_on_a_hand_checked_case():
    labels = np.array([0, 0, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    m = classification_metrics(labels, probs, ("benign", "unsure", "malignant"), prefix="val/")
    assert m["val/accuracy"] == pytest.approx(0.75)
    assert m["val/recall_benign"] == pytest.approx(0.5)
    assert m["val/recall_unsure"] == pytest.approx(1.0)
    # F1: benign 2/3, unsure 2/3, malignant 1 -> macro 7/9
    assert m["val/macro_f1"] == pytest.approx(7 / 9)
    assert m["val/auc"] == pytest.approx(1.0)


def _version(path: Path) -> Path:
    """Where the live version's Zarr group and marker are (the store keeps versions)."""
    return Path(NoduleStore.open(str(path)).root)


def _break_marker(path: Path) -> None:
    (_version(path) / COMPLETION_MARKER).unlink()


def _break_lengths(path: Path) -> None:
    import zarr

    group = zarr.open_group(str(_version(path)), mode="r+")
    group["label"].resize((group["label"].shape[0] - 3,))


def _break_nan(path: Path) -> None:
    import zarr

    group = zarr.open_group(str(_version(path)), mode="r+")
    patch = group["patches"][5]
    patch[0, 0, 0] = np.nan
    group["patches"][5] = patch


# A changed object no longer matches the marker's manifest: opening the store names it.
@pytest.mark.parametrize(
    ("breakage", "expected"),
    [(_break_marker, "no completion marker"), (_break_lengths, "label"), (_break_nan, "patches")],
    ids=["no-marker", "mismatched-lengths", "nan-patches"],
)
def test_bad_store_fails_before_any_worker(tmp_path, capsys, breakage, expected, forbid_ray):
    path = tmp_path / "bad"
    make_synthetic_store(str(path))
    breakage(path)
    rc = cli.main(["train", "--data", str(path), "--storage", str(tmp_path / "runs"), "--name", "x"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT, err
    assert str(path) in err and expected.lower() in err.lower()


def test_bad_config_and_storage_fail_before_any_worker(store, tmp_path, capsys, forbid_ray):
    rc = cli.main(["train", "--data", store.path, "--storage", str(tmp_path), "--set", "model.n_ctx=3"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT and "model.n_ctx" in err and "feature_channels" in err
    rc = cli.main(
        [
            "train",
            "--data",
            store.path,
            "--storage",
            "s3://nowhere/runs",
            "--storage-endpoint",
            "http://127.0.0.1:9",
        ]
    )
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT and "http://127.0.0.1:9" in err and "not reachable" in err


# --------------------------------------------------------------------------- slow: real runs


@pytest.fixture(scope="module")
def ray_local(ray_session):
    return ray_session


def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return torch.load(Path(checkpoint) / "model.pt", weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("ingest", ["memory", "stream"])
def test_worker_killed_mid_epoch_resumes_and_matches_uninterrupted_run(
    ray_local, store, tmp_path, capfd, ingest
):
    from cliplung.train.trainer import train

    runs = str(tmp_path / "runs")
    mode = [f"data.ingest={ingest}", "data.stream_block_rows=8", "data.stream_window_blocks=2"]
    # 54 training rows / 2 workers / micro-batch 8 = 3 steps per epoch; step 5 is inside the second
    # (and last) epoch, so the run resumes from epoch_0000 and ends with epoch 1.
    # Streaming: 27 rows per worker in 4 blocks, pooled 2 at a time; leftover rows carry into the next pool.
    clean = train(_config(store.path, runs, "clean", "train.epochs=2", "train.max_failures=0", *mode))
    faulty = train(
        _config(
            store.path,
            runs,
            "faulty",
            "train.epochs=2",
            "train.debug_fail_at_step=5",
            "train.max_failures=1",
            *mode,
        )
    )
    out = capfd.readouterr().out
    assert "[fault injection] rank 0 exits at step 5" in out
    assert "resuming from" in out and "epoch_0000" in out
    assert faulty.metrics["epoch"] == clean.metrics["epoch"] == 1
    a, b = _weights(clean.checkpoint), _weights(faulty.checkpoint)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after recovery"
