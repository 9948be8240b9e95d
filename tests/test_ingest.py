"""The training input (cliplung.data.ingest): fixed shards, per-epoch order from (seed, epoch, rank),
the memory/stream choice. Fast: no Ray (the streaming reads run in-process here), but for one slow
test of the reader actors on the suite's embedded Ray; training on streamed reads is in the slow
resume test of tests/test_train.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from probes import modules_imported_by

from cliplung.config import ConfigError, load_config
from cliplung.data import ingest
from cliplung.data.ingest import (
    MemoryData,
    StreamData,
    compute_splits,
    in_memory_bytes,
    ingest_mode,
    rank_rows,
    read_block,
    stream_memory_bytes,
)
from cliplung.train.trainer import steps_per_epoch


def _config(store, *extra):
    return load_config("debug", [f"data.store={store.path}", *extra])


def _rows(batches) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


def test_shards_are_fixed_equal_and_disjoint(synthetic_store):
    cfg = _config(synthetic_store, "train.workers=2")
    splits = compute_splits(synthetic_store, cfg.data)
    train = [rank_rows(splits.train, r, 2, equal=True) for r in range(2)]
    val = [rank_rows(splits.val, r, 2, equal=False) for r in range(2)]
    assert len(train[0]) == len(train[1]) == len(splits.train) // 2
    assert set(train[0]).isdisjoint(train[1]) and set(train[0]) | set(train[1]) <= set(splits.train)
    assert np.array_equal(np.concatenate(val), splits.val)  # every validation row scored once
    assert len(train[0]) // cfg.train.micro_batch_size == steps_per_epoch(cfg, splits)


def _memory(store, rank=0, world=2, seed=0):
    cfg = _config(store)
    splits = compute_splits(store, cfg.data)
    shard = {
        name: read_block(store, cfg.data.task, rank_rows(rows, rank, world, equal=name == "train"))
        for name, rows in (("train", splits.train), ("val", splits.val))
    }
    return shard, MemoryData.of_arrays(shard["train"], shard["val"], seed=seed, rank=rank)


def test_memory_mode_reshuffles_its_shard_per_epoch_from_seed_epoch_rank(synthetic_store):
    shard, data = _memory(synthetic_store)
    micro = 8
    epoch0 = _rows(data.train_batches(0, micro))
    rows = set(shard["train"]["index"].tolist())
    assert len(epoch0) == len(rows) // micro and all(len(b) == micro for b in epoch0)
    flat = [r for b in epoch0 for r in b]
    assert len(set(flat)) == len(flat) and set(flat) <= rows
    assert _rows(data.train_batches(0, micro)) == epoch0  # a replayed epoch is the same epoch
    assert _rows(_memory(synthetic_store)[1].train_batches(0, micro)) == epoch0  # a restarted worker too
    assert _rows(data.train_batches(1, micro)) != epoch0
    assert _rows(_memory(synthetic_store, seed=1)[1].train_batches(0, micro)) != epoch0
    batch = next(data.train_batches(0, micro))
    assert batch["patches"].dtype == torch.float16 and batch["patches"].shape[1:] == (16, 16, 16)
    i = shard["train"]["index"].tolist().index(batch["index"][0].item())
    assert torch.equal(batch["patches"][0], torch.from_numpy(shard["train"]["patches"][i]))
    assert batch["label"][0].item() == shard["train"]["label"][i]
    val = _rows(data.val_batches(5))
    assert [r for b in val for r in b] == shard["val"]["index"].tolist()


def test_memory_mode_batches_are_the_epoch_order_whichever_epochs_came_before(synthetic_store):
    """Each epoch is laid out once and the next one is gathered ahead (in a thread) from the current
    layout: batch ``i`` of epoch ``e`` is still the shard's rows ``order_e[i*m:(i+1)*m]``, in turn,
    replayed, skipped to (a resumed run) or twice in a row, and the batches are slices of one
    layout (nothing gathered per batch)."""
    shard, data = _memory(synthetic_store)
    micro = 8
    index = shard["train"]["index"]

    def expected(epoch):
        order = torch.randperm(len(index), generator=ingest.shuffle_generator(0, epoch, 0)).numpy()
        rows = index[order]
        return [rows[i : i + micro].tolist() for i in range(0, len(rows) - len(rows) % micro, micro)]

    for epoch in (0, 1, 2, 2, 0, 5, 6):
        batches = list(data.train_batches(epoch, micro))
        assert _rows(batches) == expected(epoch), epoch
        assert len({b["patches"].untyped_storage().data_ptr() for b in batches}) == 1
        for b in batches[:2]:
            i = index.tolist().index(b["index"][0].item())
            assert torch.equal(b["patches"][0], torch.from_numpy(shard["train"]["patches"][i]))
            assert torch.equal(b["attributes"][0], torch.from_numpy(shard["train"]["attributes"][i]))
    resumed = _memory(synthetic_store)[1]
    assert _rows(resumed.train_batches(6, micro)) == expected(6)


def test_an_error_in_the_background_gather_reaches_the_training_loop():
    def fails():
        raise MemoryError("no room for the next epoch's layout")

    with pytest.raises(MemoryError, match="next epoch"):
        ingest._Background(fails).result()
    assert ingest._Background(lambda: 7).result() == 7


class _LocalStream(StreamData):
    """Streaming with the reads in this process (the order logic is StreamData's own)."""

    def _blocks(self, pieces):
        self.reads = getattr(self, "reads", 0) + len(pieces)
        for piece in pieces:
            yield read_block(self.store, self.task, piece, self.unsure_range)


def _stream(store, rank=0, block_rows=8, window=2, cls=_LocalStream):
    cfg = _config(store)
    splits = compute_splits(store, cfg.data)
    return cls(
        store,
        cfg.data.task,
        rank_rows(splits.train, rank, 2, equal=True),
        rank_rows(splits.val, rank, 2, equal=False),
        seed=0,
        rank=rank,
        device=torch.device("cpu"),
        block_rows=block_rows,
        readers=2,
        window=window,
    )


def test_stream_mode_gives_a_fixed_deterministic_share_per_epoch(synthetic_store):
    data = _stream(synthetic_store)
    micro = 8
    rows = data.rows["train"]
    epoch0 = _rows(data.train_batches(0, micro))
    assert len(epoch0) == len(rows) // micro and all(len(b) == micro for b in epoch0)
    flat = [r for b in epoch0 for r in b]
    assert len(set(flat)) == len(flat) and set(flat) <= set(rows.tolist())
    again = _stream(synthetic_store)
    assert _rows(again.train_batches(0, micro)) == epoch0
    assert _rows(data.train_batches(1, micro)) != epoch0
    assert [p.tolist() for p in data.epoch_pieces(1)] != [p.tolist() for p in data.epoch_pieces(0)]
    assert sorted(np.concatenate(data.epoch_pieces(3)).tolist()) == rows.tolist()
    val = _rows(data.val_batches(5))
    assert [r for b in val for r in b] == data.rows["val"].tolist()


def test_auto_mode_keeps_stores_within_the_budget_in_memory(synthetic_store):
    cfg = _config(synthetic_store)
    splits = compute_splits(synthetic_store, cfg.data)
    size = in_memory_bytes(synthetic_store, splits)
    assert size == (len(splits.train) + len(splits.val)) * (16**3 * 2 + ingest.ROW_EXTRA_BYTES)
    assert ingest_mode(cfg, synthetic_store, splits) == "memory"
    assert (
        ingest_mode(_config(synthetic_store, "data.memory_budget_mb=0"), synthetic_store, splits) == "stream"
    )
    forced = _config(synthetic_store, "data.memory_budget_mb=0", "data.ingest=memory")
    assert ingest_mode(forced, synthetic_store, splits) == "memory"
    bound = stream_memory_bytes(synthetic_store, _config(synthetic_store).data)
    assert bound == (4 + 2) * 256 * (16**3 * 2 + ingest.ROW_EXTRA_BYTES)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.ingest=disk", r"data.ingest: must be one of \['auto', 'memory', 'stream'\], got 'disk'"),
        ("data.memory_budget_mb=-1", r"data.memory_budget_mb: must be in \[0, "),
        ("data.stream_readers=0", r"data.stream_readers: must be in \[1, 64\], got 0"),
        ("data.stream_block_rows=0", r"data.stream_block_rows: must be in \[1, "),
        ("data.stream_window_blocks=true", r"data.stream_window_blocks: must be an integer, got True"),
    ],
)
def test_bad_ingest_settings_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("debug", [override])


def test_a_stream_plan_gives_each_rank_its_fixed_share(synthetic_store):
    from cliplung.data.ingest import build_data_plan

    cfg = _config(synthetic_store, "data.ingest=stream", "train.workers=2")
    splits = compute_splits(synthetic_store, cfg.data)
    plan = build_data_plan(cfg, synthetic_store, splits)  # streaming plans read nothing (no Ray)
    assert plan.mode == "stream" and plan.refs == () and plan.store is synthetic_store
    workers = [plan.for_worker(rank, 2, torch.device("cpu")) for rank in range(2)]
    assert all(isinstance(w, StreamData) for w in workers)
    for rank, w in enumerate(workers):
        assert np.array_equal(w.rows["train"], rank_rows(splits.train, rank, 2, equal=True))
        assert np.array_equal(w.rows["val"], rank_rows(splits.val, rank, 2, equal=False))
    assert (workers[0].block_rows, workers[0].readers, workers[0].window) == (256, 2, 4)


def test_the_reader_module_imports_neither_torch_nor_ray():
    """A streaming worker's reader actors are Ray worker processes that import only the module of
    their class (cliplung.data.reader): each one imported torch and Ray Data (0.7 GiB resident,
    about 3 s of CPU to start) while the class lived in cliplung.data.ingest."""
    loaded = {m.split(".")[0] for m in modules_imported_by("import cliplung.data.reader")}
    assert not loaded & {"torch", "ray", "deepspeed", "open_clip", "pyarrow"}, sorted(loaded)


@pytest.mark.slow
def test_reader_actors_read_what_a_local_read_gives_without_loading_torch(synthetic_store, ray_session):
    import ray
    from ray.util.state import list_actors

    from cliplung.data.reader import BlockReader

    real, local = _stream(synthetic_store, cls=StreamData), _stream(synthetic_store)
    assert _rows(real.train_batches(0, 8)) == _rows(local.train_batches(0, 8))
    assert _rows(real.val_batches(5)) == _rows(local.val_batches(5))
    readers = list_actors(filters=[("class_name", "=", BlockReader.__name__), ("state", "=", "ALIVE")])
    assert len(readers) >= real.readers == 2  # this StreamData's two, at least
    for reader in readers:
        maps = Path(f"/proc/{reader.pid}/maps").read_text()
        assert "libtorch" not in maps, f"reader actor {reader.pid} loaded torch"
    for actor in real._actors:
        ray.kill(actor)
