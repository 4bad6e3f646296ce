"""Shared pieces for the trainer tests: a small prepared corpus and a tiny-model training config."""

from __future__ import annotations

import pytest
import torch

from olmo_hybrid.config import apply_overrides
from olmo_hybrid.train.config import TrainConfig, merge_config

TINY_MODEL = {"vocab_size": 384, "d_model": 32, "n_layers": 2, "layer_pattern": "GA", "n_heads": 2,
              "gdn_heads": 2, "gdn_head_k": 16, "gdn_head_v": 16, "mlp_hidden": 64, "max_seq_len": 64,
              "rope_theta": 10000.0}


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """Run these tiny models on one thread: as fast on an idle machine, and immune to OpenMP threads
    spinning while a partner thread is descheduled on a busy one (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """12 short Shakespeare excerpts, BPE of 384 ids, one held-out document (~25k train tokens)."""
    from olmo_hybrid.data.corpus import Document, bundled_corpus
    from olmo_hybrid.data.prepare import prepare

    works = bundled_corpus()[:4]
    docs = [Document(w.text[i * 4000:(i + 1) * 4000], f"{w.name}-{i}") for w in works for i in range(3)]
    out = tmp_path_factory.mktemp("corpus") / "prepared"
    return prepare(None, out, documents=docs, bpe_vocab=384, val_fraction=0.1, workers=1, progress=False)


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory):
    """A corpus of 17 training tokens: smaller than one sequence of 32."""
    from olmo_hybrid.data.corpus import Document
    from olmo_hybrid.data.prepare import prepare

    docs = [Document("hello world. " * 5, "a"), Document("bye now", "b")]
    out = tmp_path_factory.mktemp("tinycorpus") / "prepared"
    return prepare(None, out, documents=docs, bpe_vocab=300, val_fraction=0.5, workers=1, progress=False)


def make_config(data_path, *overrides: str, **sections) -> TrainConfig:
    """The test recipe (2-layer d_model-32 model, seq 32, batch 4, 6 steps), then dotted overrides."""
    base = {
        "model": dict(TINY_MODEL),
        "data": {"path": str(data_path), "seq_len": 32, "batch_size": 4},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "trainer": {"steps": 6, "eval_interval": 3, "eval_batches": 2, "save_interval": 0, "log_interval": 1,
                    "sample_tokens": 0, "export_hf": False, "device": "cpu"},
    }
    for name, values in sections.items():
        base[name].update(values)
    return apply_overrides(merge_config(TrainConfig(), base), list(overrides))


def quiet(*_args, **_kwargs) -> None:
    pass


def use_fused_adamw(trainer) -> None:
    """Give ``trainer`` the optimizer it has on CUDA, fused AdamW (same groups and hyperparameters): the CPU
    build of torch has the same fused kernel, so the device-side skip is testable here."""
    old = trainer.optimizer
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in old.param_groups]
    d = old.defaults
    trainer.optimizer = torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], fused=True)
