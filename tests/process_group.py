"""A one-process gloo group, as Ray Train gives each worker, for tests that build a DeepSpeed engine
without Ray: import ``single_process_group`` into a test module and ask for it.

The group is created once per pytest process and never destroyed: DeepSpeed keeps references to
the groups it first saw, so a second group in the same process would leave it with dead ones
(``cliplung bench gpu`` does the same and reuses a group that exists)."""

import os
import tempfile

import pytest
import torch.distributed as dist

_ENV = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}


def ensure_single_process_group() -> None:
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            pytest.skip("a multi-process group exists in this process")
        return
    os.environ.update(_ENV)
    store = os.path.join(tempfile.mkdtemp(prefix="cliplung-test-pg-"), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


@pytest.fixture(scope="module")
def single_process_group():
    """Rank 0 of 1 over a file store (no port to pick)."""
    os.environ.update(_ENV)  # DeepSpeed checks LOCAL_RANK at every initialize
    ensure_single_process_group()
