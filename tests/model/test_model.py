"""HybridLM behaviour: sizes, packed documents, cached prefill and decode, generation, left padding, input errors."""

import json

import pytest
import torch

from olmo_hybrid.config import ConfigError, ModelConfig, model_preset
from olmo_hybrid.model import HybridLM


def small(pattern="GGGA", rope=10_000.0, **kw):
    cfg = dict(vocab_size=61, d_model=48, n_layers=4, n_heads=4, gdn_heads=2, gdn_head_k=12, gdn_head_v=24,
               mamba_head_dim=12, mamba_state_size=16, mamba_n_groups=2, mlp_hidden=96, rope_theta=rope,
               max_seq_len=400, layer_pattern=pattern)
    cfg.update(kw)
    torch.manual_seed(0)
    return HybridLM(ModelConfig(**cfg)).eval()


def test_seven_b_parameter_count_on_meta():
    with torch.device("meta"):
        model = HybridLM(model_preset("olmo-hybrid-7b"), init=False)
    assert model.num_params() == 7_430_870_688
    assert model.config.num_params() == 7_430_870_688


@pytest.mark.parametrize("name", ["tiny", "60m", "190m", "1b"])
def test_preset_counts_agree_with_modules(name):
    with torch.device("meta"):
        model = HybridLM(model_preset(name), init=False)
    assert model.num_params() == model.config.num_params()


def test_ladder_matches_published_non_embedding_counts():
    # OLMo-core's hybrid-ladder non-embedding counts (LM head included), from its ladder fitting script.
    for name, expected in [("60m", 72.9e6), ("190m", 254.4e6), ("760m", 947.9e6), ("1b", 1.48e9)]:
        got = model_preset(name).num_params(embeddings=False)
        assert abs(got - expected) / expected < 0.005, (name, got)


@pytest.mark.parametrize("pattern", ["GGGA", "GA", "A", "G", "AGGA", "MMMA", "M"])
def test_packed_documents_equal_separate_runs(pattern):
    model = small(pattern)
    lengths = [37, 1, 70, 20]
    docs = [torch.randint(0, 61, (1, n)) for n in lengths]
    ids = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids)
        alone = torch.cat([model(d) for d in docs], dim=1)
    assert (packed - alone).abs().max() < 1e-4 * alone.abs().max()


def test_a_caller_built_context_replaces_the_models_own():
    """``context=`` (context parallelism builds one per slice) is used as given: the context the model would
    build gives the same logits; with doc_ids too it is refused."""
    from olmo_hybrid import ops
    from olmo_hybrid.model.context import ForwardContext, document_mask

    model = small("GA")
    ids = torch.randint(0, 61, (2, 30))
    doc_ids = torch.cat([torch.zeros(2, 12, dtype=torch.long), torch.ones(2, 18, dtype=torch.long)], dim=1)
    ctx = ForwardContext(model.model.rotary_emb(torch.arange(30)[None].expand(2, 30)), document_mask(doc_ids),
                         ops.reset_mask_from_doc_ids(doc_ids))
    with torch.no_grad():
        assert torch.equal(model(ids, context=ctx), model(ids, doc_ids=doc_ids))
        assert not torch.equal(model(ids, context=ForwardContext(ctx.rope)), model(ids, doc_ids=doc_ids))
    with pytest.raises(ValueError, match="replaces doc_ids"):
        model(ids, doc_ids=doc_ids, context=ctx)


@pytest.mark.parametrize("pattern", ["GGGA", "G", "A", "MMMA", "MGAM"])
def test_chunked_prefill_and_decode_equal_full_forward(pattern):
    model = small(pattern)
    ids = torch.randint(0, 61, (2, 150))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 150)
        parts = [model(ids[:, s:e], cache=cache.for_prefill(slice(0, 2), s))
                 for s, e in [(0, 65), (65, 130), (130, 131)]]
        parts += [model(ids[:, t:t + 1], cache=cache.for_decode(slice(0, 2))) for t in range(131, 150)]
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-4 * full.abs().max()
    assert cache.lengths.tolist() == [150, 150]


def test_greedy_generate_equals_loop_of_full_forwards():
    model = small()
    prompt = torch.randint(0, 61, (3, 17))
    out = model.generate(prompt, max_new_tokens=24)
    ref = prompt
    with torch.no_grad():
        for _ in range(24):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_left_padded_batch_equals_each_prompt_alone():
    model = small()
    prompts = [torch.randint(2, 61, (n,)) for n in (5, 23, 14)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    batch = model.generate(ids, max_new_tokens=12, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=12)
        assert torch.equal(batch[i, width:], alone[0, len(p):])


def test_eos_stops_rows_and_pads_them():
    model = small()
    prompt = torch.randint(0, 61, (2, 9))
    free = model.generate(prompt, max_new_tokens=10)
    eos = int(free[0, 9 + 2])  # row 0 emits this token at step 2
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=eos)
    row0 = out[0, 9:].tolist()
    first = row0.index(eos)
    assert first <= 2 and all(t == eos for t in row0[first:])


def test_sampling_respects_top_k_and_is_seeded():
    model = small()
    prompt = torch.randint(0, 61, (4, 5))
    a = model.generate(prompt, 8, temperature=1.0, top_k=3, seed=1)
    b = model.generate(prompt, 8, temperature=1.0, top_k=3, seed=1)
    c = model.generate(prompt, 8, temperature=1.0, top_k=3, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Each row samples as its prompt does alone with the same seed (the engine's counter-based draws).
    assert torch.equal(model.generate(prompt[2:3], 8, temperature=1.0, top_k=3, seed=1), a[2:3])
    with torch.no_grad():
        logits = model(a[:, :-1])[:, 4:]
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == a[:, 5:, None]).any(-1).all()


def test_bad_token_ids_and_long_prompts_are_rejected():
    model = small()
    with pytest.raises(ValueError, match="row 0 has token id 61 outside the vocabulary"):
        model.generate(torch.tensor([[1, 61]]), 2)
    with pytest.raises(ValueError, match="row 1 has token id -1 outside the vocabulary"):
        model.generate(torch.tensor([[1, 2], [0, -1]]), 2, attention_mask=torch.tensor([[1, 1], [0, 1]]))
    with pytest.raises(ValueError, match="integer"):
        model(torch.ones(1, 3))
    with pytest.raises(ValueError, match="max_seq_len=400"):
        model.generate(torch.randint(0, 61, (1, 390)), max_new_tokens=20)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(torch.ones(1, 4, dtype=torch.long), 2, attention_mask=torch.tensor([[1, 1, 0, 0]]))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="model.layer_pattern"):
        ModelConfig(layer_pattern="GGXA")
    with pytest.raises(ConfigError, match="model.n_kv_heads"):
        ModelConfig(n_kv_heads=7)
    with pytest.raises(ConfigError, match="unknown model preset"):
        model_preset("3b")


def test_checkpoint_errors(tmp_path):
    model = small()
    with pytest.raises(FileNotFoundError, match="config.json"):
        HybridLM.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    again = HybridLM.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        HybridLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_size": None}))
    with pytest.raises(ConfigError, match="hidden_size"):
        HybridLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight' has shape \(96, 48\), the config implies \(100, 48\)"):
        HybridLM.from_pretrained(tmp_path)

    from safetensors.torch import load_file, save_file

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.linear_attn.A_log"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing 1 tensor.*layers.1.linear_attn.A_log"):
        HybridLM.from_pretrained(tmp_path)


def test_sharded_bf16_checkpoint_and_name_variants(tmp_path):
    from safetensors.torch import load_file, save_file

    model = small()
    model.save_pretrained(tmp_path, dtype=torch.bfloat16, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = HybridLM.from_pretrained(tmp_path)
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), n

    # Older HF norm names, OLMo-core exporter names, transformers' fused conv: all accepted.
    one = tmp_path / "variants"
    model.save_pretrained(one)
    sd = load_file(one / "model.safetensors")
    pre = "model.layers.0."
    sd[pre + "attention_layer_norm.weight"] = sd.pop(pre + "input_layernorm.weight")
    sd[pre + "linear_attn.out_proj.weight"] = sd.pop(pre + "linear_attn.o_proj.weight")
    sd[pre + "linear_attn.norm.weight"] = sd.pop(pre + "linear_attn.o_norm.weight")
    sd[pre + "linear_attn.conv1d.weight"] = torch.cat([sd.pop(pre + f"linear_attn.{p}_conv1d.weight") for p in "qkv"])
    save_file(sd, one / "model.safetensors")
    variant = HybridLM.from_pretrained(one)
    x = torch.randint(0, 61, (1, 30))
    with torch.no_grad():
        assert torch.equal(variant(x), model(x))
