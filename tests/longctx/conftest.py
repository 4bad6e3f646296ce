"""A small prepared corpus and a tiny trained base run with RoPE, which the extension tests continue."""

from __future__ import annotations

import pytest

from olmo_hybrid.config import apply_overrides
from olmo_hybrid.train.config import TrainConfig, merge_config

BASE_LEN = 32
TINY_MODEL = {"vocab_size": 384, "d_model": 32, "n_layers": 2, "layer_pattern": "GA", "n_heads": 2, "gdn_heads": 2,
              "gdn_head_k": 16, "gdn_head_v": 16, "mlp_hidden": 64, "max_seq_len": BASE_LEN, "rope_theta": 10_000.0}


def quiet(*_args, **_kwargs) -> None:
    pass


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """12 Shakespeare excerpts of 8,000 characters, BPE of 384 ids, one held-out document (~50k train tokens)."""
    from olmo_hybrid.data.corpus import Document, bundled_corpus
    from olmo_hybrid.data.prepare import prepare

    works = bundled_corpus()[:4]
    docs = [Document(w.text[i * 8000:(i + 1) * 8000], f"{w.name}-{i}") for w in works for i in range(3)]
    return prepare(None, tmp_path_factory.mktemp("corpus") / "prepared", documents=docs, bpe_vocab=384,
                   val_fraction=0.1, workers=1, progress=False)


def base_config(data, *overrides: str) -> TrainConfig:
    cfg = merge_config(TrainConfig(), {
        "model": dict(TINY_MODEL),
        "data": {"path": str(data), "seq_len": BASE_LEN, "batch_size": 8},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "trainer": {"steps": 4, "eval_interval": 0, "eval_batches": 1, "log_interval": 1, "sample_tokens": 0,
                    "device": "cpu", "max_minutes": 0.0},
    })
    return apply_overrides(cfg, list(overrides))


@pytest.fixture(scope="session")
def base_run(corpus, tmp_path_factory):
    """A finished 4-step run at 32 tokens with RoPE (checkpoint, hf/ export and tokenizer)."""
    from olmo_hybrid.train import train

    run = tmp_path_factory.mktemp("base") / "run"
    train(base_config(corpus), run, log=quiet)
    return run
