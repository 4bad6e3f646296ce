"""transformers' olmo_hybrid checkpoints through every loader we have (HybridLM.from_pretrained,
load_model_and_tokenizer, ``olmo-hybrid convert``): sharded and bf16 files, round trips that keep every tensor bit for bit,
damaged checkpoints refused by tensor name, and greedy generation equal to transformers' generate."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_hf_config import CASES, small
from test_hf_interop import VOCAB, rel_err, tf_model

from olmo_hybrid.checkpoint import load_model_and_tokenizer
from olmo_hybrid.cli.convert import main as convert_main
from olmo_hybrid.errors import CheckpointError
from olmo_hybrid.model import HybridLM
from olmo_hybrid.model.hf_io import canonical_state_dict

transformers = pytest.importorskip("transformers")
from transformers import OlmoHybridForCausalLM  # noqa: E402

# the keys transformers' model reads (not its bookkeeping or init ranges)
COMPUTED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id",
                 "tie_word_embeddings", "rope_parameters", "attention_bias", "attention_dropout", "layer_types",
                 "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                 "linear_conv_kernel_dim", "linear_allow_neg_eigval", "max_position_embeddings")


def tensors(path, cfg):
    files = sorted(path.glob("*.safetensors"))
    return canonical_state_dict({n: t for f in files for n, t in load_file(str(f)).items()}, cfg)


def tf_fp32(path):
    return OlmoHybridForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture
def bf16_sharded(tmp_path):
    """transformers' bf16 checkpoint in several shards with an index (GQA, RoPE, bos and two eos ids)."""
    src = tmp_path / "src"
    config = small(**CASES["rope-theta-5e5-gqa"], bos_token_id=2, eos_token_id=[1, 3])
    tf_model(tmp_path / "fp32", config).to(torch.bfloat16).save_pretrained(src, max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 2
    return src


def test_bf16_sharded_checkpoint_round_trips_bit_for_bit(tmp_path, bf16_sharded):
    src = bf16_sharded
    ref = tf_fp32(src)
    x = torch.randint(0, VOCAB, (2, 200))
    with torch.no_grad():
        want = ref(x).logits
    ours = HybridLM.from_pretrained(src).eval()  # bf16 values, computed in fp32
    with torch.no_grad():
        assert rel_err(ours(x), want) < 1e-4
    converted = tmp_path / "converted"
    assert convert_main([str(src), str(converted), "--max-shard-size", "30KB", "--verify"]) == 0  # bf16, sharded
    assert len(list(converted.glob("*.safetensors"))) > 2
    ours.save_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    before = tensors(src, ours.config)
    src_config = json.loads((src / "config.json").read_text())
    for out in (converted, tmp_path / "saved"):
        after = tensors(out, ours.config)
        assert set(after) == set(before)
        for n in before:
            assert after[n].dtype == torch.bfloat16 and torch.equal(after[n], before[n]), n
        written = json.loads((out / "config.json").read_text())
        assert {k: written[k] for k in COMPUTED_KEYS} == {k: src_config[k] for k in COMPUTED_KEYS}
        with torch.no_grad():
            assert torch.equal(tf_fp32(out)(x).logits, want)  # the same model to transformers, bit for bit


def test_load_model_and_tokenizer_reads_transformers_checkpoints(bf16_sharded):
    model, tok = load_model_and_tokenizer(bf16_sharded, require_tokenizer=False)
    assert tok is None and not model.training
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (0, 2, [1, 3])
    model16, _ = load_model_and_tokenizer(bf16_sharded, dtype=torch.bfloat16, require_tokenizer=False)
    assert all(torch.equal(a.float(), b) for a, b in zip(model16.state_dict().values(), model.state_dict().values()))


def _edit(path, change):
    f = path / "model.safetensors"
    state = load_file(str(f))
    change(state)
    save_file(state, str(f))


DAMAGE = {
    "missing": (lambda s: s.pop("model.layers.1.linear_attn.dt_bias"),
                r"missing 1 tensor\(s\): model.layers.1.linear_attn.dt_bias"),
    "missing-lm-head": (lambda s: s.pop("lm_head.weight"), r"missing 1 tensor\(s\): lm_head.weight"),
    "extra": (lambda s: s.update({"model.layers.0.self_attn.rotary.weight": torch.zeros(3)}),
              r"unexpected tensor\(s\): model.layers.0.self_attn.rotary.weight"),
    "shape": (lambda s: s.update({"model.layers.3.self_attn.k_proj.weight": torch.zeros(64, 64)}),
              r"tensor 'model.layers.3.self_attn.k_proj.weight' has shape \(64, 64\), the config implies \(32, 64\)"),
    "layer-past-the-end": (lambda s: s.update({"blocks.9.feed_forward.w1.weight": torch.zeros(3)}),
                           "refers to layer 9, but the model has 4 layers"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoints_are_refused_naming_the_tensor(tmp_path, damage):
    change, message = DAMAGE[damage]
    tf_model(tmp_path, small(**CASES["rope-theta-5e5-gqa"]))
    _edit(tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        load_model_and_tokenizer(tmp_path, require_tokenizer=False)


def test_single_file_wins_over_an_index_beside_it_as_in_transformers(tmp_path, bf16_sharded):
    tf_model(tmp_path / "other", json.loads((bf16_sharded / "config.json").read_text()), seed=5)  # other weights
    (bf16_sharded / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    ref, ours = tf_fp32(bf16_sharded), HybridLM.from_pretrained(bf16_sharded)
    x = torch.randint(0, VOCAB, (1, 100))
    with torch.no_grad():
        assert rel_err(ours(x), ref(x).logits) < 1e-4


def test_multi_token_prediction_heads_are_dropped_as_transformers_drops_them(tmp_path):
    tf_model(tmp_path, small())
    _edit(tmp_path, lambda s: s.update({"mtp.layers.0.weight": torch.ones(4)}))
    assert "mtp.layers.0.weight" not in HybridLM.from_pretrained(tmp_path).state_dict()
    assert "mtp.layers.0.weight" not in OlmoHybridForCausalLM.from_pretrained(tmp_path).state_dict()


def test_damaged_shard_index_is_refused_naming_the_file(bf16_sharded):
    index_file = bf16_sharded / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = index["weight_map"]
    assert shards["model.norm.weight"] != shards["model.embed_tokens.weight"]
    shards["model.norm.weight"] = shards["model.embed_tokens.weight"]  # the wrong shard
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lacks tensor 'model.norm.weight' that model.safetensors.index.json"):
        load_model_and_tokenizer(bf16_sharded, require_tokenizer=False)
    index_file.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="expected a 'weight_map' object"):
        load_model_and_tokenizer(bf16_sharded, require_tokenizer=False)


@pytest.mark.parametrize("name", ["released-shape-nope", "rope-theta-5e5-gqa", "attention-first",
                                  "gva-2-key-4-value-heads"])
def test_greedy_generation_equals_transformers_generate(tmp_path, name):
    ref = tf_model(tmp_path, small(**CASES[name]))
    ref.generation_config.eos_token_id = None  # run the whole length in both
    ours = HybridLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(2, VOCAB, (1, 200))  # longer than three GDN chunks of 64
    want = ref.generate(prompt, max_new_tokens=16, do_sample=False)
    got = ours.generate(prompt, max_new_tokens=16)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("layout", ["different-lm-head", "lm-head-only"])
def test_tied_config_is_read_against_the_tensors_present_as_transformers_reads_it(tmp_path, layout):
    """tie_word_embeddings true over a file whose lm_head.weight differs from the embedding loads untied, and over a
    file with only lm_head.weight ties the embedding to it (transformers' tie_weights). Before: the first dropped
    the LM head silently (other logits), the second was refused for a missing embedding."""
    def change(state):
        if layout == "lm-head-only":
            state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
        else:
            state["lm_head.weight"] = torch.randn_like(state["model.embed_tokens.weight"])

    tf_model(tmp_path / "src", small(**CASES["tied-embeddings"]))
    _edit(tmp_path / "src", change)
    x = torch.randint(0, VOCAB, (2, 70))
    with torch.no_grad():
        want = tf_fp32(tmp_path / "src")(x).logits
        ours = HybridLM.from_pretrained(tmp_path / "src")
        assert ours.config.tie_embeddings == (layout == "lm-head-only")
        assert rel_err(ours(x), want) < 1e-4
        assert convert_main([str(tmp_path / "src"), str(tmp_path / "out")]) == 0
        assert torch.equal(tf_fp32(tmp_path / "out")(x).logits, want)  # the same model to transformers, bit for bit
