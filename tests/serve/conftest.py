"""Fixtures of the HTTP server tests: a tiny checkpoint with a tokenizer, and a server for it on 127.0.0.1."""

import pytest
import torch
from serve_util import running_server

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.data.tokenizer import train_bpe
from olmo_hybrid.model import HybridLM


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory):
    """A HF checkpoint directory of a tiny GGGA model (fp32) whose greedy continuations vary (peaked logits)."""
    path = tmp_path_factory.mktemp("served")
    tok = train_bpe(["the cat sat on the mat, the dog sat on the log. A cat is not a dog."] * 4, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=304, d_model=32, n_layers=4, n_heads=2, gdn_heads=2, gdn_head_k=8, gdn_head_v=16,
                      mlp_hidden=64, max_seq_len=160, layer_pattern="GGGA")
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def server(served_checkpoint):
    pytest.importorskip("uvicorn")
    with running_server(served_checkpoint) as (url, srv):
        yield url, srv
