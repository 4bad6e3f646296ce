"""The training-memory estimate against what autograd really keeps, and the up-front refusal built on it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from .conftest import quiet

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.errors import ConfigError
from olmo_hybrid.longctx import check_fits, estimate_training_memory, extend
from olmo_hybrid.longctx import memory as memory_mod
from olmo_hybrid.model import HybridLM
from olmo_hybrid.train.config import TrainConfig, merge_config


def train_config(pattern: str, seq_len: int = 256, **trainer) -> TrainConfig:
    model = ModelConfig(vocab_size=512, d_model=128, n_layers=4, layer_pattern=pattern, n_heads=4, gdn_heads=4,
                        gdn_head_k=32, gdn_head_v=64, mlp_hidden=384, rope_theta=1e4, max_seq_len=1 << 20)
    return merge_config(TrainConfig(model=model), {"data": {"seq_len": seq_len, "batch_size": 1},
                                                   "trainer": {"dtype": "fp32", **trainer}})


def saved_bytes_per_token(model: HybridLM, seq_len: int) -> float:
    """Bytes of the distinct tensors autograd saves for backward in one forward (weights excluded)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, model.config.vocab_size, (1, seq_len)))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in weights) / seq_len


@pytest.mark.parametrize("pattern,mamba", [("A", {}), ("G", {}), ("GGGA", {}), ("M", {}), ("GGMA", {}),
                                           ("M", {"mamba_state_size": 16, "mamba_expand": 4, "gdn_head_v": 16})])
def test_activation_estimate_tracks_what_autograd_keeps_on_cpu(pattern, mamba):
    cfg = train_config(pattern)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **mamba))
    torch.manual_seed(0)
    measured = saved_bytes_per_token(HybridLM(cfg.model), cfg.data.seq_len)
    estimate = estimate_training_memory(cfg, "cpu").kept_per_token
    assert 0.9 * measured <= estimate <= 1.5 * measured, (estimate, measured)


@pytest.mark.parametrize("pattern,tie", [("GGGA", False), ("GGMA", True)])
def test_state_memory_counts_the_parameters_info_and_the_modules_count(pattern, tie):
    from olmo_hybrid.cli.info import summarize

    cfg = train_config(pattern)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tie_embeddings=tie))
    with torch.device("meta"):
        n = sum(p.numel() for p in HybridLM(cfg.model, init=False).parameters())  # a tied matrix once
    assert summarize(cfg.model, 8192, 65536, 2)["params_total"] == n
    assert estimate_training_memory(cfg, "cuda").static == 16 * n  # fp32 weights, gradients, two AdamW moments
    bf16 = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, dtype="bf16"))
    assert estimate_training_memory(bf16, "cuda").static == 18 * n  # and the bf16 copy


def test_checkpointing_and_the_chunked_loss_shrink_the_estimate():
    plain = estimate_training_memory(train_config("GGGA", 8192), "cuda")
    ac = estimate_training_memory(train_config("GGGA", 8192, activation_checkpointing="full"), "cuda")
    chunked = estimate_training_memory(train_config("GGGA", 8192, loss_chunk_tokens=1024), "cuda")
    assert ac.activations < plain.activations / 2 and chunked.loss == plain.loss // 8
    sharded = estimate_training_memory(train_config("GGGA", 8192), "cuda", world_size=8)
    assert sharded.static == plain.static // 8 and sharded.activations == plain.activations  # FSDP shards state only
    cp = merge_config(train_config("GGGA", 8192), {"parallel": {"cp_degree": 4}})
    split = estimate_training_memory(cp, "cuda", world_size=8)
    assert split.tokens == 8192 // 4 and split.static == sharded.static  # each rank holds a quarter of a sequence
    # ... but every rank builds the whole sequences' [T, T] document mask (context_parallel.shard_context): Ulysses
    # attention runs over all T queries of its heads
    masked = merge_config(cp, {"data": {"doc_masking": True}})
    assert estimate_training_memory(masked, "cuda", world_size=8).activations - split.activations == 8192 * 8192


def test_a_length_that_cannot_fit_is_refused_up_front_saying_what_fits(monkeypatch, base_run, tmp_path):
    cfg = train_config("GGGA", 65536)
    budget = estimate_training_memory(train_config("GGGA", 4096), "cpu").total
    monkeypatch.setattr(memory_mod, "device_memory", lambda device: (budget, "the test device"))
    with pytest.raises(ConfigError, match=r"more than the test device\. What would fit: data.seq_len <= ") as e:
        check_fits(cfg, torch.device("cpu"))
    fits = int(str(e.value).split("data.seq_len <= ")[1].split(" ")[0].replace(",", ""))
    assert 4096 <= fits < 65536 and "activation_checkpointing=full" in str(e.value)
    check_fits(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=fits)), torch.device("cpu"))
    monkeypatch.setattr(memory_mod, "device_memory", lambda device: (10 * 2**20, "a 10 MiB device"))
    with pytest.raises(ConfigError, match="more than a 10 MiB device"):
        extend(base_run, tmp_path / "ext", "drope", 1 << 16, steps=1, log=quiet)
    assert not (tmp_path / "ext").exists()  # refused before any work
