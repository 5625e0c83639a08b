import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Intra-op threads only slow the tests' small models down on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
