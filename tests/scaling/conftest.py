"""Shared pieces for the scaling tests: a small prepared corpus and a tiny ladder config."""

from __future__ import annotations

import json

import pytest

TINY_SIZES = {
    "t32": {"d_model": 32, "n_layers": 2, "n_heads": 2, "gdn_heads": 2, "gdn_head_k": 16, "gdn_head_v": 16,
            "mlp_hidden": 64, "rope_theta": 10000.0, "max_seq_len": 64},
    "t48": {"d_model": 48, "n_layers": 2, "n_heads": 2, "gdn_heads": 2, "gdn_head_k": 16, "gdn_head_v": 32,
            "mlp_hidden": 96, "rope_theta": 10000.0, "max_seq_len": 64},
}


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """40 passages of 800 characters of one play, BPE of 384 ids, 1 held out: ~17k training tokens and a
    validation split of ~450 (every phase of a ladder scores all of it)."""
    from olmo_hybrid.data import Document, bundled_corpus, prepare

    text = bundled_corpus()[0].text
    passages = [Document(text[i:i + 800], f"p{i}") for i in range(0, 32_000, 800)]
    out = tmp_path_factory.mktemp("ladder") / "corpus"
    return prepare(None, out, documents=passages, bpe_vocab=384, val_fraction=0.025, workers=1, progress=False)


def tiny_ladder(data, **fields) -> dict:
    """2 sizes x 2 architectures x 2 budgets; 4-13 steps of 4 x 16 tokens per run, on the CPU."""
    cfg = {"name": "tiny", "data": str(data), "seq_len": 16, "sizes": ["t32", "t48"],
           "architectures": ["hybrid-half", "transformer"], "budgets": [0.5, 1], "custom_sizes": TINY_SIZES,
           "recipe": {"tokens_per_param": 0.01, "warmup_tokens_per_param": 0.001, "decay_fraction": 0.25,
                      "fixed_batch_sequences": 4, "fixed_lr": 0.003},
           "train": ["trainer.device=cpu"], "save_interval": 3}
    cfg.update(fields)
    return cfg


def write_ladder(path, data, **fields):
    path.write_text(json.dumps(tiny_ladder(data, **fields)))
    return path
