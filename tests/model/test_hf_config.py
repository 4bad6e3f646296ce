"""Every config.json field of transformers' OlmoHybridConfig: either we compute what OlmoHybridForCausalLM computes
from the same file (logits, and gradients where cheap; fp32, CPU, random weights) or loading refuses the setting
by name. Checkpoints are transformers' own (random init, ``save_pretrained``) under the config.json as written."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from test_hf_interop import VOCAB, rel_err, tf_model

from olmo_hybrid.config import ConfigError
from olmo_hybrid.model import HybridLM
from olmo_hybrid.model.hf_io import canonical_state_dict, config_from_hf

pytest.importorskip("transformers")
from transformers import OlmoHybridForCausalLM  # noqa: E402

SMALL = {"model_type": "olmo_hybrid", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 4, "num_attention_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
         "linear_value_head_dim": 32, "linear_num_value_heads": 2, "pad_token_id": 0, "eos_token_id": 1,
         "rope_parameters": {"rope_theta": None}}
G, A = "linear_attention", "full_attention"
DROP = object()  # a key left out of config.json (None writes an explicit null)

# name -> changes to SMALL. Each must be a different model (rope, heads, pattern ...).
CASES = {
    "released-shape-nope": {},
    "rope-theta-5e5-gqa": {"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}, "num_key_value_heads": 2},
    "mqa-legacy-top-level-theta": {"num_key_value_heads": 1, "rope_parameters": DROP, "rope_theta": 2e4},
    "gva-2-key-4-value-heads": {"linear_num_value_heads": 4},
    # transformers' default for linear_num_value_heads is num_attention_heads (4), not linear_num_key_heads (2)
    "value-heads-default": {"linear_num_value_heads": DROP},
    "head-dims-default": {"linear_key_head_dim": DROP, "linear_value_head_dim": DROP},
    "conv-2-positive-eigvals-eps": {"linear_conv_kernel_dim": 2, "linear_allow_neg_eigval": False,
                                    "rms_norm_eps": 1e-2},
    "conv-5": {"linear_conv_kernel_dim": 5},
    "attention-first": {"layer_types": [A, G, G, G]},
    "irregular-6": {"num_hidden_layers": 6, "layer_types": [G, A, A, G, G, A]},
    "layer-types-default-3": {"num_hidden_layers": 3, "layer_types": DROP},  # G G A
    "layer-types-default-2": {"num_hidden_layers": 2, "layer_types": DROP},  # G A: transformers forces one A
    "tied-embeddings": {"tie_word_embeddings": True},
    "metadata-and-ignored-keys": {"hidden_act": "swish", "head_dim": 16, "attention_dropout": 0.0,
                                  "attention_bias": False, "initializer_range": 0.5, "use_cache": False,
                                  "dtype": "bfloat16", "linear_a_log_max": 4.0, "sliding_window": 8,
                                  "max_position_embeddings": 300, "bos_token_id": 2, "eos_token_id": [1, 3]},
}


def small(**changes) -> dict:
    return {k: v for k, v in {**SMALL, **changes}.items() if v is not DROP}


def loss_and_grads(model, logits_fn, x, target):
    model.zero_grad()
    loss = F.cross_entropy(logits_fn(x).flatten(0, 1), target.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(CASES))
def test_config_fields_compute_what_transformers_computes(tmp_path, name):
    ref = tf_model(tmp_path, small(**CASES[name]))
    ours = HybridLM.from_pretrained(tmp_path).eval()
    types = ref.config.layer_types
    assert ours.config.layer_pattern == "".join("G" if t == G else "A" for t in types)
    x = torch.randint(0, VOCAB, (2, 200))  # three chunks of 64 and a ragged tail
    with torch.no_grad():
        want = ref(x, use_cache=False).logits
        assert rel_err(ours(x), want) < 1e-4
    # and back: what we write is the same model to transformers
    ours.save_pretrained(tmp_path / "export")
    again = OlmoHybridForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(again(x, use_cache=False).logits, want)


@pytest.mark.parametrize("name", ["released-shape-nope", "rope-theta-5e5-gqa", "gva-2-key-4-value-heads",
                                  "tied-embeddings"])
def test_gradients_equal_transformers_including_the_padding_row(tmp_path, name):
    """transformers builds its embedding with padding_idx=pad_token_id: that row never gets a gradient."""
    ref = tf_model(tmp_path, small(**CASES[name]))
    ours = HybridLM.from_pretrained(tmp_path)
    x = torch.randint(0, VOCAB, (2, 100))
    x[:, ::7] = 0  # the pad id, inside the sequence
    target = torch.randint(0, VOCAB, (2, 100))
    want_loss, want = loss_and_grads(ref, lambda t: ref(t, use_cache=False).logits, x, target)
    got_loss, got = loss_and_grads(ours, ours, x, target)
    assert rel_err(got_loss, want_loss) < 1e-5
    if not ours.config.tie_embeddings:  # tied, the row is the LM head's too
        assert got["model.embed_tokens.weight"][0].abs().max() == 0
    want = canonical_state_dict(want, ours.config)  # transformers' fused conv gradient, split as our weights
    assert set(got) == set(want)
    # fp32 rounding: against an fp64 run of ours, ours and transformers' were measured up to 7e-5 and 1e-4 off
    for n in got:
        assert rel_err(got[n], want[n]) < 3e-4, n


def test_all_gdn_pattern_transformers_refuses_computes_its_layers(tmp_path):
    # transformers' config validation refuses a pattern without attention; its layers still run (no cache)
    config = small(num_hidden_layers=3, layer_types=[G, G, G])
    ref = tf_model(tmp_path, {**config, "layer_types": [G, G, A]}, layer_types=[G, G, G])
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = HybridLM.from_pretrained(tmp_path).eval()
    assert ours.config.layer_pattern == "GGG"
    x = torch.randint(0, VOCAB, (1, 200))
    with torch.no_grad():
        assert rel_err(ours(x), ref(x, use_cache=False).logits) < 1e-4


def test_missing_fields_take_transformers_defaults(tmp_path, caplog):
    """A config.json with only the model type: the released shape (vocab 100352, hidden 3840, 30 heads ...), pad
    100277, eos 100257, as transformers; but no RoPE (the released weights' training), where transformers puts
    theta 10000, with a warning that says so."""
    from transformers import OlmoHybridConfig

    with caplog.at_level(logging.WARNING):
        cfg = config_from_hf({"model_type": "olmo_hybrid"})
    assert "no rope_theta" in caplog.text
    tf = OlmoHybridConfig()
    assert (cfg.vocab_size, cfg.d_model, cfg.mlp_hidden, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads,
            cfg.max_seq_len, cfg.norm_eps, cfg.tie_embeddings) == \
        (tf.vocab_size, tf.hidden_size, tf.intermediate_size, tf.num_hidden_layers, tf.num_attention_heads,
         tf.num_key_value_heads, tf.max_position_embeddings, tf.rms_norm_eps, tf.tie_word_embeddings)
    assert (cfg.gdn_heads, cfg.gdn_v_heads, cfg.gdn_head_k, cfg.gdn_head_v, cfg.gdn_conv_size,
            cfg.gdn_allow_neg_eigval) == \
        (tf.linear_num_key_heads, tf.linear_num_value_heads, tf.linear_key_head_dim, tf.linear_value_head_dim,
         tf.linear_conv_kernel_dim, tf.linear_allow_neg_eigval)
    assert [{"G": G, "A": A}[t] for t in cfg.layer_types] == tf.layer_types
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (tf.pad_token_id, tf.bos_token_id,
                                                                      tf.eos_token_id)
    assert tf.rope_parameters["rope_theta"] == 10000.0 and cfg.rope_theta is None
    assert "transformers would apply RoPE with theta 10000" in caplog.text


def test_small_config_without_optional_fields_equals_transformers(tmp_path):
    # no pad/eos (transformers' 100277 / 100257 need the full vocabulary), no head counts; the theta is the one
    # key given (a config without it is NoPE here, RoPE at 10000 in transformers: test above)
    config = {"model_type": "olmo_hybrid", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
              "num_attention_heads": 2, "rope_theta": 10000.0}
    ref = tf_model(tmp_path, config)
    ours = HybridLM.from_pretrained(tmp_path).eval()
    assert ours.config.rope_theta == 10_000.0 and ours.config.pad_token_id == 100277
    x = torch.randint(0, 100352, (1, 150))
    with torch.no_grad():
        assert rel_err(ours(x), ref(x, use_cache=False).logits) < 1e-4


def test_unknown_keys_are_ignored_with_a_warning_naming_them(caplog):
    with caplog.at_level(logging.WARNING):
        config_from_hf(small(sliding_window=8, some_new_flag=True, architectures=["OlmoHybridForCausalLM"]))
    assert "ignoring sliding_window, some_new_flag" in caplog.text and "architectures" not in caplog.text


REFUSED = [
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1 is not supported"),
    ({"head_dim": 32}, r"head_dim=32 is not supported.*\(64 / 4\)"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config=.* is not supported"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}},
     "rope_parameters.rope_type='linear' is not implemented"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2.0}}, "'dynamic' is not implemented"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "llama3", "factor": 8.0}}, "'llama3' is not implemented"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}, "rope_theta": 1e4}, "'longrope' is not implemented"),
    ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial_rotary_factor=0.5"),
    ({"layer_types": [G, "sliding_attention", A, G]}, r"unsupported entries \['sliding_attention'\]"),
    ({"layer_types": [G, A]}, "layer_types has 2 entries, num_hidden_layers=4"),
    ({"num_key_value_heads": 3}, r"num_key_value_heads \(n_kv_heads here\): n_heads=4 is not a multiple of"),
    ({"linear_num_value_heads": 3}, r"linear_num_value_heads \(gdn_v_heads here\)"),
    ({"num_attention_heads": 5}, r"num_attention_heads \(n_heads here\): d_model=64 is not divisible"),
    ({"pad_token_id": DROP, "vocab_size": 500}, r"pad_token_id \(pad_token_id here\): 100277 is not a token id"),
    ({"pad_token_id": VOCAB}, "pad_token_id.*97 is not a token id"),
    ({"hidden_size": None}, "hidden_size: expected an integer"),
    ({"hidden_size": "wide"}, "hidden_size: expected an integer"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps: expected a number"),
    ({"model_type": "olmo3"}, "model_type must be one of"),
]


@pytest.mark.parametrize("changes,message", REFUSED, ids=[m.split(" ")[0][:30] for _, m in REFUSED])
def test_settings_we_do_not_implement_are_refused_naming_the_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        config_from_hf(small(**changes))
