"""A one-process gloo group, as Ray Train gives each worker, for tests that build a DeepSpeed engine
without Ray: import ``single_process_group`` into a test module and ask for it."""

import os

import pytest
import torch.distributed as dist

_ENV = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}


@pytest.fixture(scope="module")
def single_process_group(tmp_path_factory):
    """Rank 0 of 1 over a file store (no port to pick); torch.distributed is torn down afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(_ENV)
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
