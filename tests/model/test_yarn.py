"""YaRN against transformers (rope_parameters -> frequencies -> logits, both directions), and its refusals."""

import json

import pytest
import torch
from test_hf_interop import VOCAB, randomize, rel_err, tf_model

from olmo_hybrid.config import ConfigError, ModelConfig, model_preset
from olmo_hybrid.model import HybridLM
from olmo_hybrid.model.hf_config import config_to_hf
from olmo_hybrid.model.hf_io import config_from_hf, read_config
from olmo_hybrid.model.rope import rope_parameters

transformers = pytest.importorskip("transformers")
from transformers import OlmoHybridConfig, OlmoHybridForCausalLM  # noqa: E402
from transformers.modeling_rope_utils import _compute_yarn_parameters  # noqa: E402

ORIGINAL = 64  # sequences of 300 tokens run 4.7x past it
# The paper's settings (factor 8, beta 32/1), then explicit attention factor without truncation, then DeepSeek-style
# mscale / mscale_all_dim with other betas and a fractional factor.
YARN_SETS = {
    "paper": {"factor": 8.0, "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": ORIGINAL},
    "attention_factor": {"factor": 4.0, "attention_factor": 1.3, "truncate": False,
                         "original_max_position_embeddings": ORIGINAL},
    "mscale": {"factor": 2.5, "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2,
               "original_max_position_embeddings": 2 * ORIGINAL},
}


def hf_dict(theta=10_000.0, max_pos=512, **top) -> dict:
    return {"model_type": "olmo_hybrid", "vocab_size": VOCAB, "hidden_size": 96, "intermediate_size": 160,
            "num_hidden_layers": 4, "num_attention_heads": 4, "linear_num_key_heads": 4, "linear_key_head_dim": 16,
            "linear_value_head_dim": 32, "max_position_embeddings": max_pos, "pad_token_id": 0, "eos_token_id": 1,
            "rope_theta": theta, **top}


@pytest.mark.parametrize("name", list(YARN_SETS))
def test_yarn_frequencies_and_scaling_equal_transformers_bit_for_bit(name):
    params = {"rope_theta": 500_000.0, "rope_type": "yarn", **YARN_SETS[name]}
    tf = OlmoHybridConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=8 * ORIGINAL,
                          rope_parameters=dict(params))
    ref_freq, ref_scale = _compute_yarn_parameters(tf)
    ours = config_from_hf({**hf_dict(), "hidden_size": 256, "num_attention_heads": 2, "linear_num_value_heads": 4,
                           "rope_parameters": params})
    freq, scale = rope_parameters(ours)
    assert torch.equal(freq, ref_freq) and scale == ref_scale
    assert not torch.equal(freq, rope_parameters(ModelConfig(**{**vars(ours), **_no_yarn()}))[0])


# (hidden_size, num_attention_heads, top-level keys, rope dict): every axis of transformers' YaRN, read from a
# config.json as transformers reads it. Head dims 8 to 256; theta in the dict, top level, as an int, or absent.
GRID = [
    (256, 2, {}, {"rope_theta": 500_000.0, "factor": 1.0, "original_max_position_embeddings": 64}),
    (96, 4, {}, {"rope_theta": 10_000.0, "factor": 1, "original_max_position_embeddings": 64}),
    (96, 2, {}, {"rope_theta": 1e6, "factor": 2.5, "beta_fast": 16, "beta_slow": 2,
                 "original_max_position_embeddings": 100}),
    (128, 4, {"rope_theta": 20_000.0, "original_max_position_embeddings": 48}, {"factor": 3.7}),
    (128, 1, {"max_position_embeddings": 4096}, {"rope_theta": 10_000.0, "factor": 8.0}),  # original: the window
    (64, 8, {"original_max_position_embeddings": 50}, {"rope_theta": 10_000.0, "factor": 6.0,
                                                       "original_max_position_embeddings": 100}),
    (192, 2, {}, {"rope_theta": 10_000.0, "factor": 4.0, "attention_factor": 1.3, "truncate": False,
                  "original_max_position_embeddings": 64}),
    (192, 2, {}, {"rope_theta": 10_000.0, "factor": 4.0, "truncate": None, "original_max_position_embeddings": 64}),
    (192, 2, {}, {"rope_theta": 10_000.0, "factor": 4.0, "truncate": True, "original_max_position_embeddings": 64}),
    (256, 2, {}, {"rope_theta": 10_000.0, "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 1.0,
                  "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 4096}),  # DeepSeek-V3
    (256, 2, {}, {"rope_theta": 10_000.0, "factor": 4.0, "mscale": 0.707, "original_max_position_embeddings": 64}),
    (256, 2, {}, {"rope_theta": 10_000.0, "factor": 4.0, "mscale_all_dim": 0.707,
                  "original_max_position_embeddings": 64}),
    (256, 2, {}, {"rope_theta": 10_000.0, "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0,
                  "original_max_position_embeddings": 64}),
    (256, 2, {}, {"rope_theta": 10_000.0, "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 1.0,
                  "attention_factor": 0.9, "original_max_position_embeddings": 64}),
    (96, 4, {"rope_scaling": {"type": "yarn", "factor": 2.0, "beta_fast": 8, "original_max_position_embeddings": 32}},
     {"rope_theta": 1e6, "rope_type": "default"}),  # legacy rope_scaling replaces rope_parameters
    (96, 4, {"rope_theta": None}, {"factor": 4.0, "original_max_position_embeddings": 64}),  # theta: transformers'
    (512, 2, {}, {"rope_theta": 500_000, "factor": 16.0, "beta_fast": 64, "beta_slow": 0.5,
                  "original_max_position_embeddings": 8192}),
    (16, 2, {}, {"rope_theta": 1234.5, "factor": 0.5, "original_max_position_embeddings": 64}),
]


def grid_config(hidden, heads, top, params) -> dict:
    d = {**hf_dict(), "hidden_size": hidden, "num_attention_heads": heads, "linear_num_value_heads": 4, **top,
         "rope_parameters": {"rope_type": "yarn", **params}}
    return {k: v for k, v in d.items() if v is not None}


def tf_rope(tmp_path, config: dict):
    """transformers' rotary embedding of a config.json exactly as written."""
    from transformers.models.olmo_hybrid.modeling_olmo_hybrid import OlmoHybridRotaryEmbedding

    (tmp_path / "config.json").write_text(json.dumps(config))
    return OlmoHybridRotaryEmbedding(OlmoHybridConfig.from_pretrained(tmp_path))


def test_yarn_grid_equals_transformers_and_exports_what_it_reads_back(tmp_path):
    for i, case in enumerate(GRID):
        config = grid_config(*case)
        ref = tf_rope(tmp_path, config)
        ours = config_from_hf(config)
        freq, scale = rope_parameters(ours)
        assert torch.equal(freq, ref.inv_freq) and scale == ref.attention_scaling, (i, case)
        exported = config_to_hf(ours, torch.float32)
        again = tf_rope(tmp_path, exported)  # transformers reads our export as the same positions
        assert torch.equal(again.inv_freq, ref.inv_freq) and again.attention_scaling == ref.attention_scaling, i
        assert config_from_hf(exported) == ours.resolved(), i


@pytest.mark.parametrize("index", [3, 5, 15], ids=["head32-top-level-theta-and-original", "head8-original-both",
                                                    "no-theta"])
def test_grid_logits_equal_transformers_past_the_original_length(tmp_path, index):
    ref = tf_model(tmp_path, grid_config(*GRID[index]))
    ours = HybridLM.from_pretrained(tmp_path).eval()
    assert ours.config.rope_original_max_seq_len <= 64
    x = torch.randint(0, VOCAB, (2, 300))
    with torch.no_grad():
        assert rel_err(ours(x), ref(x).logits) < 1e-4


@pytest.mark.parametrize("name", ["paper", "mscale"])
def test_greedy_decode_past_the_original_length_equals_transformers_generate(tmp_path, name):
    # the engine's cached decode (positions from the cache lengths) against transformers' generate and our own
    # full forward, from a prompt already past the original length
    ref = tf_model(tmp_path, hf_dict(rope_parameters={"rope_theta": 10_000.0, "rope_type": "yarn", **YARN_SETS[name]}))
    ref.generation_config.eos_token_id = None
    ours = HybridLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(2, VOCAB, (1, 150))
    got = ours.generate(prompt, max_new_tokens=12)
    assert got.tolist() == ref.generate(prompt, max_new_tokens=12, do_sample=False).tolist()
    with torch.no_grad():
        assert torch.equal(ours(got[:, :-1])[0, 149:].argmax(-1), got[0, 150:])


def _no_yarn() -> dict:
    return {"rope_type": "default", **{f: None for f in ("rope_factor", "rope_original_max_seq_len", "rope_beta_fast",
                                                         "rope_beta_slow", "rope_attention_factor", "rope_mscale",
                                                         "rope_mscale_all_dim", "rope_truncate")}}


@pytest.mark.parametrize("name", ["paper", "mscale"])
def test_import_yarn_checkpoint_equals_transformers(tmp_path, name):
    ref = tf_model(tmp_path, hf_dict(rope_parameters={"rope_theta": 10_000.0, "rope_type": "yarn", **YARN_SETS[name]}))
    ours = HybridLM.from_pretrained(tmp_path).eval()
    assert ours.config.rope_type == "yarn" and ours.config.rope_original_max_seq_len == \
        YARN_SETS[name]["original_max_position_embeddings"]
    x = torch.randint(0, VOCAB, (2, 300))
    with torch.no_grad():
        want = ref(x).logits
        assert rel_err(ours(x), want) < 1e-4
        # the same weights with plain RoPE are a different model: the comparison above can fail
        plain = HybridLM(ModelConfig(**{**vars(ours.config), **_no_yarn()}), init=False)
        plain.load_state_dict(ours.state_dict())
        assert rel_err(plain(x), want) > 1e-2


def test_legacy_rope_scaling_and_top_level_original_length_read_as_transformers_reads_them(tmp_path):
    # rope_scaling replaces rope_parameters; the top-level rope_theta fills in, the top-level original length wins
    # over the dict's.
    config = hf_dict(theta=20_000.0, max_pos=300, original_max_position_embeddings=50,
                     rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
                     rope_scaling={"type": "yarn", "factor": 6, "original_max_position_embeddings": 100,
                                   "beta_fast": 8})
    ref = tf_model(tmp_path, config)
    assert ref.config.rope_parameters["rope_type"] == "yarn"  # transformers took rope_scaling too
    ours = HybridLM.from_pretrained(tmp_path).eval()
    c = ours.config
    assert (c.rope_theta, c.rope_type, c.rope_original_max_seq_len, c.rope_factor, c.rope_beta_fast) == \
        (20_000.0, "yarn", 50, 6.0, 8.0)
    x = torch.randint(0, VOCAB, (2, 300))
    with torch.no_grad():
        assert rel_err(ours(x), ref(x).logits) < 1e-4


@pytest.mark.parametrize("name", ["paper", "attention_factor"])
def test_export_yarn_to_transformers_and_round_trip(tmp_path, name):
    s = YARN_SETS[name]
    cfg = model_preset("tiny", vocab_size=VOCAB, d_model=96, n_layers=4, n_heads=4, gdn_heads=4, gdn_head_k=16,
                       gdn_head_v=32, mlp_hidden=160, max_seq_len=512, rope_type="yarn",
                       rope_factor=s["factor"], rope_original_max_seq_len=ORIGINAL,
                       rope_beta_fast=s.get("beta_fast"), rope_beta_slow=s.get("beta_slow"),
                       rope_attention_factor=s.get("attention_factor"), rope_truncate=s.get("truncate"))
    ours = HybridLM(cfg).eval()
    randomize(ours, 2)
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    assert written == {"rope_theta": 10_000.0, "rope_type": "yarn", **s}
    ref = OlmoHybridForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, VOCAB, (2, 300))
    with torch.no_grad():
        assert rel_err(ours(x), ref(x).logits) < 1e-4
    assert read_config(tmp_path) == ours.config.resolved()  # every field survives the round trip


def test_rope_settings_we_do_not_implement_are_refused_by_name(tmp_path):
    yarn = {"rope_theta": 10_000.0, "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}
    cases = [({**yarn, "low_freq_factor": 1.0}, "'low_freq_factor', which rope_type 'yarn' does not take"),
             ({**yarn, "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
             ({"full_attention": yarn}, "per layer type is not supported"),
             ({**yarn, "factor": "eight"}, r"rope_parameters.factor: expected a number"),
             ({"rope_theta": 1e4, "rope_type": "yarn"}, "with rope_type 'yarn' needs 'factor'")]
    for params, message in cases:
        with pytest.raises(ConfigError, match=message):
            config_from_hf(hf_dict(rope_parameters=params))
    # NoPE makes every other rope setting moot, in transformers as here
    assert config_from_hf(hf_dict(rope_parameters={**yarn, "rope_theta": None})).rope_type == "default"
    base = dict(vocab_size=61, d_model=48, n_layers=4, n_heads=4, gdn_heads=2, gdn_head_k=12, gdn_head_v=24,
                mlp_hidden=96, rope_theta=10_000.0)
    for extra, message in [({"rope_factor": 4.0}, "model.rope_factor: is a YaRN setting"),
                           ({"rope_type": "yarn", "rope_original_max_seq_len": 64}, "model.rope_factor: is required"),
                           ({"rope_type": "yarn", "rope_factor": 4.0, "rope_original_max_seq_len": 64,
                             "rope_theta": None}, "rope_theta is null"),
                           ({"rope_type": "yarn", "rope_factor": -1.0, "rope_original_max_seq_len": 64},
                            "model.rope_factor: must be positive"),
                           ({"rope_type": "yarn", "rope_factor": 2.0, "rope_original_max_seq_len": 64,
                             "rope_beta_fast": 1.0, "rope_beta_slow": 4.0}, "at least rope_beta_slow")]:
        with pytest.raises(ConfigError, match=message):
            ModelConfig(**{**base, **extra})
