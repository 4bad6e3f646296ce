"""Fixtures of the HTTP server tests: a tiny checkpoint with a tokenizer, and a server for it on 127.0.0.1."""

import pytest
from serve_util import running_server, save_tiny_checkpoint


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory):
    """A HF checkpoint directory of a tiny GGGA model with a 160-token context (see ``save_tiny_checkpoint``)."""
    path = tmp_path_factory.mktemp("served")
    save_tiny_checkpoint(path, max_seq_len=160)
    return path


@pytest.fixture(scope="module")
def server(served_checkpoint):
    pytest.importorskip("uvicorn")
    with running_server(served_checkpoint) as (url, srv):
        yield url, srv
