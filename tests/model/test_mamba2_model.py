"""Models with Mamba2 layers (pattern letter M): parameter counts against OLMo-core's ladder, the HF-style
checkpoint in this project's own format, and ``olmo-hybrid info``. Decoding and packed documents are covered by
the pattern-parametrized tests of test_model.py and tests/serve."""

import dataclasses
import json
import re

import pytest
import torch

from olmo_hybrid.cli import main
from olmo_hybrid.config import ConfigError, ModelConfig, model_preset
from olmo_hybrid.model import HybridLM
from olmo_hybrid.model.cache import HybridCache
from olmo_hybrid.model.hf_io import MAMBA2_MODEL_TYPE, config_from_hf, config_to_hf


def tiny(pattern="MMMA", **kw) -> HybridLM:
    cfg = dict(vocab_size=61, d_model=48, n_layers=4, n_heads=4, gdn_heads=2, gdn_head_k=12, gdn_head_v=24,
               mamba_head_dim=12, mamba_state_size=16, mamba_n_groups=2, mlp_hidden=96, rope_theta=1e4,
               max_seq_len=256, layer_pattern=pattern)
    torch.manual_seed(0)
    return HybridLM(ModelConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("size,pattern,expected", [
    ("100m", "M", 109_746_048), ("100m", "MMMA", 107_743_776),
    ("190m", "M", 207_115_584), ("190m", "MMMA", 202_925_232),
])
def test_ladder_counts_equal_olmo_core_published_mamba_counts(size, pattern, expected):
    """OLMo-core's ladder analysis (model_specs.py, _LEGACY_PARAM_COUNTS; non-embedding = LM head included) counts
    projection biases and no conv bias; with those two flags our count is exact."""
    cfg = dataclasses.replace(model_preset(size), layer_pattern=pattern, mamba_proj_bias=True,
                              mamba_conv_bias=False)
    assert cfg.num_params(embeddings=False) == expected


@pytest.mark.parametrize("name", ["190m", "1b"])
def test_preset_counts_agree_with_modules(name):
    cfg = model_preset(name, layer_pattern="hybrid-mamba2")
    assert cfg.mamba_heads == cfg.n_heads and cfg.mamba_head_dim == 2 * cfg.d_model // cfg.n_heads
    with torch.device("meta"):
        model = HybridLM(cfg, init=False)
    assert model.num_params() == cfg.num_params() and cfg.n_mamba_layers == 3 * cfg.n_layers // 4


def test_config_errors_name_the_mamba_fields():
    with pytest.raises(ConfigError, match="model.mamba_head_dim: 64 does not divide"):
        ModelConfig(d_model=48, n_layers=1, n_heads=4, layer_pattern="M")
    with pytest.raises(ConfigError, match="model.mamba_n_groups: 3 does not divide the 8 Mamba2 heads"):
        ModelConfig(d_model=48, n_layers=1, n_heads=4, layer_pattern="M", mamba_head_dim=12, mamba_n_groups=3)
    with pytest.raises(ConfigError, match="'M' \\(Mamba2\\)"):
        ModelConfig(layer_pattern="GX")


def test_checkpoint_round_trips_in_our_own_format(tmp_path):
    model = tiny(mamba_proj_bias=True, mamba_conv_bias=False, mamba_chunk_size=128)
    with torch.no_grad():  # non-zero biases, so that a dropped tensor would show
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == MAMBA2_MODEL_TYPE and "transformers" in saved["olmo_hybrid_note"]
    assert saved["layer_types"] == ["mamba2", "mamba2", "mamba2", "full_attention"]
    assert saved["mamba_num_heads"] == 8 and saved["mamba_use_bias"] and not saved["mamba_use_conv_bias"]
    loaded = HybridLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    ids = torch.randint(0, 61, (2, 40))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    from transformers import AutoConfig

    with pytest.raises(ValueError, match=MAMBA2_MODEL_TYPE):  # transformers refuses it rather than guessing
        AutoConfig.from_pretrained(tmp_path)


def test_gdn_attention_checkpoints_keep_the_transformers_format():
    hf = config_to_hf(tiny("GGGA").config, torch.float32)
    assert hf["model_type"] == "olmo_hybrid" and not any(k.startswith("mamba") for k in hf)


def test_mismatched_mamba_configs_are_refused():
    hf = config_to_hf(tiny().config, torch.float32)
    with pytest.raises(ConfigError, match="layer type 'mamba2' goes with model_type 'olmo_hybrid_mamba2'"):
        config_from_hf({**hf, "model_type": "olmo_hybrid"})
    with pytest.raises(ConfigError, match="mamba_num_heads=6 disagrees"):
        config_from_hf({**hf, "mamba_num_heads": 6})


# transformers' Mamba2Config fields that OlmoHybridConfig lacks -> (a value other than the one tiny() computes, what
# our format does with it as mamba_<field>): "read" (a different model), "refused" (a ConfigError naming the key) or
# "init" (initialisation only: the same model, accepted silently).
MAMBA2_CONFIG_FIELDS = {
    "num_heads": (16, "refused"), "head_dim": (6, "read"), "state_size": (7, "read"), "expand": (1, "read"),
    "conv_kernel": (3, "read"), "n_groups": (4, "read"), "use_bias": (True, "read"), "use_conv_bias": (False, "read"),
    "chunk_size": (128, "read"), "layer_norm_epsilon": (1e-6, "refused"), "time_step_limit": ([0.0, 0.1], "refused"),
    "residual_in_fp32": (True, "refused"), "time_step_rank": (4, "init"), "time_step_min": (0.01, "init"),
    "time_step_max": (0.2, "init"), "time_step_floor": (1e-3, "init"), "rescale_prenorm_residual": (True, "init"),
}


def test_every_mamba2_config_field_is_read_refused_or_initialisation_only(caplog):
    """Our format is the only reader of its Mamba2 keys: none may be ignored, the way a time_step_limit was (the
    layer then computed without the clamp the file asked for, with only a warning)."""
    from transformers import Mamba2Config, OlmoHybridConfig

    assert set(MAMBA2_CONFIG_FIELDS) == set(Mamba2Config.__annotations__) - set(OlmoHybridConfig.__annotations__)
    base = {k: v for k, v in config_to_hf(tiny().config, torch.float32).items() if k != "mamba_num_heads"}
    ours = config_from_hf(base)
    for field, (value, outcome) in MAMBA2_CONFIG_FIELDS.items():
        key = f"mamba_{field}"
        if outcome == "refused":
            with pytest.raises(ConfigError, match=re.escape(f"{key}={value!r} ")):
                config_from_hf({**base, key: value})
        else:
            with caplog.at_level("WARNING"):
                caplog.clear()
                got = config_from_hf({**base, key: value})
            assert not caplog.records, key
            assert (got != ours) == (outcome == "read"), key
        if field != "head_dim":  # top-level head_dim is the attention's (test_hf_config.py)
            with pytest.raises(ConfigError, match=re.escape(f"{field}={value!r} is not supported: a Mamba2Config")):
                config_from_hf({**base, field: value})
    # at the value implemented, the fixed fields load; an unknown mamba_ key does not
    implemented = {"mamba_layer_norm_epsilon": 1e-5, "mamba_time_step_limit": [0, float("inf")],
                   "mamba_residual_in_fp32": False}
    assert config_from_hf({**base, **implemented}) == ours
    with pytest.raises(ConfigError, match="mamba_norm_before_gate=True is not supported: not a Mamba2 setting"):
        config_from_hf({**base, "mamba_norm_before_gate": True})


def test_info_counts_mamba2_parameters_flops_and_state(tmp_path, capsys):
    model = tiny()
    model.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path), "--context", "100", "--seq-len", "128", "--kv-bytes", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["model"]
    assert row["params_total"] == sum(p.numel() for p in model.parameters())
    mem = row["inference_bytes_per_sequence"]
    assert mem["mamba_state"] == 3 * 8 * 12 * 16 * 4 and mem["gdn_state"] == 0  # 3 layers x H x P x N fp32
    cache = HybridCache(model.config, num_slots=2, capacity=100)
    assert cache.nbytes() == 2 * mem["total"]
    # FLOPs: 6 per dense weight plus the SSD's 2CN + 2CP + 4NP per token-head (x3 for forward + backward).
    dense = 6 * (model.config.num_params(embeddings=False) - 48)
    attn = 3 * 2 * 2 * 64 * 48
    assert row["train_flops_per_token"] == dense + attn + 3 * 3 * 8 * (2 * 64 * 16 + 2 * 64 * 12 + 4 * 16 * 12)
