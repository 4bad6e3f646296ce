import os

import pytest
import torch

# Triton picks interpreted or compiled kernels when its modules are first imported, and other libraries in the
# suite (transformers) import it early: without a GPU, ask for the interpreter before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The suite runs tiny models, where intra-op threads only add synchronisation: on a busy 2-core machine
    two threads were measured 20-80x slower than one for a tiny forward."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
