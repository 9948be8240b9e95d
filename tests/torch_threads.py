"""A module-scoped autouse fixture for the model tests: import it into a test module to use it."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Debug-size models gain nothing from intra-op threads, and OpenMP threads that wait for each
    # other on a shared 2-core machine turn a 10 s run into minutes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
