import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The suite runs tiny models, where intra-op threads only add synchronisation: on a busy 2-core machine
    two threads were measured 20-80x slower than one for a tiny forward."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
