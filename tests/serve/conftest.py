import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The serve tests use tiny models: intra-op threads only add synchronisation (20x slower on a busy
    2-core machine), so run them on one thread and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
