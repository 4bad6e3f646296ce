"""A Hugging Face ``olmo_hybrid`` config.json <-> ModelConfig, field by field as transformers' OlmoHybridConfig and
OlmoHybridForCausalLM read it (transformers 5.25).

Every key falls in one of three sets (the table is docs/architecture.md, "config.json fields"):
- read: the model's shape and numerics. A missing key takes transformers' default (hidden_size 3840, pad_token_id
  100277, ...), so we build what transformers builds from the same file; the one exception is a config without
  any rope_theta, read as NoPE (the released weights) where transformers would use theta 10000 (a yarn dict without
  a theta gets 10000, as in transformers);
- refused unless at the one value we implement (hidden_act silu, attention_bias false, attention_dropout 0,
  head_dim = hidden_size / num_attention_heads, no quantization_config, rope types other than default and yarn):
  the error names the key and its value;
- metadata (initialisation ranges, generation and bookkeeping keys): accepted, nothing to compute. A key in none of
  the sets is one transformers' model does not read either: it is ignored with a warning naming it.

Patterns with Mamba2 layers use this project's own ``model_type: olmo_hybrid_mamba2`` (module docstring of
``model/hf_io.py``). Its Mamba2 keys are transformers' Mamba2Config fields prefixed ``mamba_`` (the fields it shares
with OlmoHybridConfig, such as hidden_size and hidden_act, stay top-level): read, refused unless at the one value
our layer implements, or initialisation only; an unknown ``mamba_`` key, or a Mamba2Config name without the prefix,
is refused by name there.
"""

from __future__ import annotations

import logging
import math
import re

import torch

from olmo_hybrid.config import ATTN, GDN, MAMBA, ConfigError, ModelConfig, coerce_field
from olmo_hybrid.model.mamba2 import NORM_EPS

log = logging.getLogger(__name__)

MAMBA2_MODEL_TYPE = "olmo_hybrid_mamba2"  # our own format: patterns with Mamba2 layers
MODEL_TYPES = ("olmo_hybrid", "olmo3_5_hybrid", "olmo3_2_hybrid", MAMBA2_MODEL_TYPE)
LAYER_TYPES = {"linear_attention": GDN, "full_attention": ATTN, "mamba2": MAMBA}
MAMBA2_NOTE = ("Written by olmo-hybrid for a layer pattern with Mamba2 layers ('mamba2' in layer_types), which "
               "transformers' olmo_hybrid model does not implement: this is olmo-hybrid's own format. Load it with "
               "olmo_hybrid.model.HybridLM.from_pretrained; transformers' AutoModel refuses the model type.")
# config.json key -> ModelConfig field, for the Mamba2 layers (transformers' Mamba2Config names, prefixed).
MAMBA2_FIELDS = {"mamba_expand": "mamba_expand", "mamba_head_dim": "mamba_head_dim",
                 "mamba_state_size": "mamba_state_size", "mamba_n_groups": "mamba_n_groups",
                 "mamba_conv_kernel": "mamba_conv_size", "mamba_chunk_size": "mamba_chunk_size",
                 "mamba_use_bias": "mamba_proj_bias", "mamba_use_conv_bias": "mamba_conv_bias"}
# The other Mamba2Config fields, prefixed alike, that change what the layer computes: our layer implements one value
# of each (key -> (accepted values, what it is here)); any other value is refused by name, never ignored.
MAMBA2_FIXED = {
    "mamba_layer_norm_epsilon": ((NORM_EPS,), f"the gated norm's eps is {NORM_EPS}"),
    "mamba_time_step_limit": (([0.0, math.inf],), "dt is not clamped (time_step_limit (0, inf))"),
    "mamba_residual_in_fp32": ((False,), "the residual stream stays in the model's dtype"),
}
# Mamba2Config fields that only initialise weights (time_step_rank: nothing at all in transformers' Mamba2).
MAMBA2_INIT_KEYS = {"mamba_time_step_rank", "mamba_time_step_min", "mamba_time_step_max", "mamba_time_step_floor",
                    "mamba_rescale_prenorm_residual"}
MAMBA2_KEYS = set(MAMBA2_FIELDS) | set(MAMBA2_FIXED) | MAMBA2_INIT_KEYS | {"mamba_num_heads"}

# config.json key -> (ModelConfig field, transformers' default when the key is absent). Keys whose default depends
# on other keys (head counts and dims, layer_types, RoPE) are read in config_from_hf.
SIMPLE_FIELDS = {
    "vocab_size": ("vocab_size", 100352), "hidden_size": ("d_model", 3840),
    "intermediate_size": ("mlp_hidden", 11008), "num_hidden_layers": ("n_layers", 32),
    "num_attention_heads": ("n_heads", 30), "max_position_embeddings": ("max_seq_len", 65536),
    "rms_norm_eps": ("norm_eps", 1e-6), "tie_word_embeddings": ("tie_embeddings", False),
    "initializer_range": ("init_std", 0.02), "linear_conv_kernel_dim": ("gdn_conv_size", 4),
    "linear_allow_neg_eigval": ("gdn_allow_neg_eigval", True),
    "pad_token_id": ("pad_token_id", 100277), "bos_token_id": ("bos_token_id", None),
    "eos_token_id": ("eos_token_id", 100257),
}
# ModelConfig field -> config.json key, to name the key in the errors of ModelConfig's own checks.
_HF_KEY = {field: key for key, (field, _) in SIMPLE_FIELDS.items()} | {
    "layer_pattern": "layer_types", "n_kv_heads": "num_key_value_heads", "gdn_heads": "linear_num_key_heads",
    "gdn_v_heads": "linear_num_value_heads", "gdn_head_k": "linear_key_head_dim",
    "gdn_head_v": "linear_value_head_dim", "rope_theta": "rope_parameters.rope_theta",
    "rope_type": "rope_parameters.rope_type"} | {field: key for key, field in MAMBA2_FIELDS.items()}
# Keys that change nothing computed here: transformers' generic bookkeeping, initialisation ranges, generation.
METADATA_KEYS = {
    "model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "use_cache", "_name_or_path",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "auto_map", "attn_implementation", "_attn_implementation",
    "tokenizer_class", "linear_a_log_min", "linear_a_log_max", "linear_dt_min", "linear_dt_max",
    "linear_dt_init_floor", "olmo_hybrid_note"}
_ROPE_KEYS_TOP = {"rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor",
                  "original_max_position_embeddings"}
# The other keys read: defaults that depend on other keys, and keys refused unless at the value we implement.
_OTHER_KEYS = {"layer_types", "num_key_value_heads", "linear_num_key_heads", "linear_num_value_heads",
               "linear_key_head_dim", "linear_value_head_dim", "hidden_act", "attention_bias", "attention_dropout",
               "head_dim", "quantization_config"}
# Mamba2Config names without our prefix (head_dim excepted: the attention's): in our format a file that has them was
# written for another model, and reading it without them would build a different Mamba2 layer.
MAMBA2_UNPREFIXED = {k.removeprefix("mamba_") for k in MAMBA2_KEYS} - _OTHER_KEYS - set(SIMPLE_FIELDS)


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """The ModelConfig of a config.json: what transformers builds from it, or a ConfigError naming the key."""
    if d.get("model_type") not in MODEL_TYPES:
        raise ConfigError(f"{source}: model_type must be one of {MODEL_TYPES}, got {d.get('model_type')!r}")
    _refuse_unimplemented(d, source)
    kwargs = {field: coerce_field(ModelConfig, field, d.get(key, default), f"{source}: {key}")
              for key, (field, default) in SIMPLE_FIELDS.items()}
    n_layers, d_model, n_heads = kwargs["n_layers"], kwargs["d_model"], kwargs["n_heads"]
    layer_types = d.get("layer_types")
    if layer_types is None:  # transformers' default: attention at i % 4 == 3, and at least the last layer
        layer_types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(n_layers)]
        if "full_attention" not in layer_types:
            layer_types[-1] = "full_attention"
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        raise ConfigError(f"{source}: layer_types must be a list of strings, got {layer_types!r}")
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise ConfigError(f"{source}: layer_types has unsupported entries {unknown} (expected {list(LAYER_TYPES)})")
    if ("mamba2" in layer_types) != (d["model_type"] == MAMBA2_MODEL_TYPE):
        raise ConfigError(f"{source}: layer type 'mamba2' goes with model_type '{MAMBA2_MODEL_TYPE}' (this project's "
                          f"format) and only with it; got model_type {d['model_type']!r} with layer types "
                          f"{sorted(set(layer_types))}")
    if len(layer_types) != n_layers:
        raise ConfigError(f"{source}: layer_types has {len(layer_types)} entries, num_hidden_layers={n_layers}")

    def optional(key, field, default):  # transformers' default for a missing or null key
        return default if d.get(key) is None else coerce_field(ModelConfig, field, d[key], f"{source}: {key}")

    gdn_heads = optional("linear_num_key_heads", "gdn_heads", n_heads)
    head_k = optional("linear_key_head_dim", "gdn_head_k", int(0.75 * d_model / gdn_heads) if gdn_heads > 0 else 0)
    kwargs.update(
        layer_pattern="".join(LAYER_TYPES[t] for t in layer_types), **rope_from_hf(d, source),
        n_kv_heads=optional("num_key_value_heads", "n_kv_heads", n_heads), gdn_heads=gdn_heads,
        # transformers' default is num_attention_heads, not linear_num_key_heads
        gdn_v_heads=optional("linear_num_value_heads", "gdn_v_heads", n_heads),
        gdn_head_k=head_k, gdn_head_v=optional("linear_value_head_dim", "gdn_head_v", 2 * head_k),
        **{field: d[key] for key, field in MAMBA2_FIELDS.items() if d.get(key) is not None})
    try:
        cfg = ModelConfig(**kwargs)
    except ConfigError as e:  # name the config.json key, not only our field
        m = re.match(r"model\.(\w+): (.*)", str(e), re.S)
        if m is None:
            raise ConfigError(f"{source}: {e}") from e
        key = _HF_KEY.get(m.group(1), m.group(1))
        raise ConfigError(f"{source}: {key} ({m.group(1)} here): {m.group(2)}") from e
    heads = d.get("mamba_num_heads")
    if heads is not None and heads != cfg.mamba_heads:
        raise ConfigError(f"{source}: mamba_num_heads={heads} disagrees with mamba_expand * hidden_size / "
                          f"mamba_head_dim = {cfg.mamba_heads}")
    ignored = sorted(set(d) - set(SIMPLE_FIELDS) - METADATA_KEYS - _ROPE_KEYS_TOP - _OTHER_KEYS - MAMBA2_KEYS)
    if ignored:
        log.warning("%s: ignoring %s: transformers' OlmoHybridForCausalLM does not read %s either",
                    source, ", ".join(ignored), "it" if len(ignored) == 1 else "them")
    return cfg


def _refuse_unimplemented(d: dict, source: str) -> None:
    """Keys transformers acts on at values we do not implement: an error naming the key and value."""
    def refuse(key, why):
        raise ConfigError(f"{source}: {key}={d[key]!r} is not supported: {why}")

    if d.get("hidden_act", "silu") not in ("silu", "swish"):
        refuse("hidden_act", "the MLP and the GDN short convolutions here use SiLU (transformers takes both "
                             "activations from hidden_act)")
    if d.get("attention_bias", False) not in (False, None):
        refuse("attention_bias", "the attention projections here have no biases")
    if d.get("attention_dropout") not in (None, 0, 0.0):
        refuse("attention_dropout", "attention dropout is not implemented (transformers applies it when training)")
    if d.get("quantization_config") is not None:
        refuse("quantization_config", "quantized checkpoints are not implemented; use unquantized weights")
    if d.get("head_dim") is not None:
        hidden, heads = d.get("hidden_size", 3840), d.get("num_attention_heads", 30)
        if not (isinstance(heads, int) and heads > 0 and d["head_dim"] * heads == hidden):
            refuse("head_dim", f"the attention head dim here is hidden_size / num_attention_heads ({hidden} / {heads})")
    if d.get("model_type") == MAMBA2_MODEL_TYPE:
        _refuse_unimplemented_mamba2(d, refuse)


def _refuse_unimplemented_mamba2(d: dict, refuse) -> None:
    """Our own format names every Mamba2 setting (``mamba_`` + transformers' Mamba2Config name): one it does not
    know, or a value of one our layer does not implement, is refused rather than ignored."""
    for key, (accepted, here) in MAMBA2_FIXED.items():
        value = list(d[key]) if isinstance(d.get(key), (list, tuple)) else d.get(key)
        if key in d and value not in accepted:
            refuse(key, f"{here}; accepted: {', '.join(map(repr, accepted))}")
    for key in sorted(d):
        if key.startswith("mamba_") and key not in MAMBA2_KEYS:
            refuse(key, f"not a Mamba2 setting of the {MAMBA2_MODEL_TYPE} format (known: "
                        f"{', '.join(sorted(MAMBA2_KEYS))})")
        if key in MAMBA2_UNPREFIXED:
            refuse(key, f"a Mamba2Config name: the {MAMBA2_MODEL_TYPE} format reads it as 'mamba_{key}'")


TRANSFORMERS_DEFAULT_THETA = 10_000.0  # PreTrainedConfig.default_theta
# rope_parameters keys (transformers) <-> ModelConfig fields, for the rope types we implement.
_YARN_KEYS = {"factor": "rope_factor", "original_max_position_embeddings": "rope_original_max_seq_len",
              "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow", "attention_factor": "rope_attention_factor",
              "mscale": "rope_mscale", "mscale_all_dim": "rope_mscale_all_dim", "truncate": "rope_truncate"}
_ROPE_KEYS = {"default": {"rope_theta", "rope_type", "type", "partial_rotary_factor"}}
_ROPE_KEYS["yarn"] = _ROPE_KEYS["default"] | set(_YARN_KEYS)


def rope_from_hf(d: dict, source: str = "config.json") -> dict:
    """ModelConfig's rope fields from a config.json, read as transformers reads them: the legacy ``rope_scaling``
    dict, when present, replaces ``rope_parameters``; a top-level ``rope_theta`` or
    ``original_max_position_embeddings`` fills in (the latter takes precedence over the dict's; without either the
    original length is max_position_embeddings); no theta anywhere is read as NoPE, as the released weights were
    trained, where transformers would use theta 10000 (with a warning saying so), unless the dict names a scaled rope
    type (yarn): that asks for RoPE, and gets transformers' theta 10000. A null theta is NoPE, and then
    every other rope setting is moot, as in transformers. A rope type we do not implement, or a setting of one we
    do (an unknown key, a partial rotary factor), is refused by name.
    """
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: {key} must be a JSON object, got {params!r}")
    if "rope_type" not in params and "type" not in params and {"full_attention", "linear_attention"} & set(params):
        raise ConfigError(f"{source}: {key} given per layer type is not supported (olmo_hybrid takes one dict)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if "rope_theta" in params:
        theta = params["rope_theta"]
    elif "rope_theta" in d:
        theta = d["rope_theta"]
    elif rope_type != "default":  # a scaled RoPE asks for RoPE: transformers' theta, as it reads the file
        theta = TRANSFORMERS_DEFAULT_THETA
    else:
        # The one key where we do not follow transformers: the released weights were trained without RoPE after
        # their long-context stage, and configs of them that lacked the key are known; transformers would put
        # RoPE at theta 10000 on them, a model that was never trained.
        log.warning("%s: no rope_theta: read as no RoPE, as the released OLMo Hybrid weights were trained "
                    "(transformers would apply RoPE with theta 10000 here); write rope_theta to choose", source)
        theta = None
    if theta is None:
        return {"rope_theta": None, "rope_type": "default"}
    if rope_type not in _ROPE_KEYS:
        raise ConfigError(f"{source}: {key}.rope_type={rope_type!r} is not implemented (implemented: "
                          f"{', '.join(_ROPE_KEYS)}, or rope_theta null for no RoPE)")
    unknown = sorted(set(params) - _ROPE_KEYS[rope_type])
    if unknown:
        raise ConfigError(f"{source}: {key} has {', '.join(map(repr, unknown))}, which rope_type {rope_type!r} does "
                          f"not take here (known: {', '.join(sorted(_ROPE_KEYS[rope_type]))})")
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{source}: partial_rotary_factor={partial} is not supported (olmo_hybrid rotates the "
                          "whole attention head)")
    out = {"rope_theta": coerce_field(ModelConfig, "rope_theta", theta, f"{source}: rope_theta"), "rope_type": rope_type}
    if rope_type == "yarn":
        for k, field in _YARN_KEYS.items():
            if params.get(k) is not None:
                out[field] = coerce_field(ModelConfig, field, params[k], f"{source}: {key}.{k}")
        if d.get("original_max_position_embeddings") is not None:
            out["rope_original_max_seq_len"] = coerce_field(ModelConfig, "rope_original_max_seq_len",
                                                            d["original_max_position_embeddings"],
                                                            f"{source}: original_max_position_embeddings")
        out.setdefault("rope_original_max_seq_len", d.get("max_position_embeddings", 65536))
        if "rope_factor" not in out:  # transformers refuses it too
            raise ConfigError(f"{source}: {key} with rope_type 'yarn' needs 'factor'")
        if "truncate" in params and params["truncate"] is None:
            out["rope_truncate"] = False  # transformers reads a null truncate as false
    return out


def rope_to_hf(cfg: ModelConfig) -> dict:
    """``rope_parameters`` for config.json: theta (null for NoPE), type, and every YaRN setting that is set."""
    out = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type}
    out.update({k: getattr(cfg, field) for k, field in _YARN_KEYS.items() if getattr(cfg, field) is not None})
    return out


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for ``cfg``: every key transformers reads, written explicitly (so none falls back to a default
    of transformers')."""
    cfg = cfg.resolved()
    inv = {v: k for k, v in LAYER_TYPES.items()}
    mamba = MAMBA in cfg.layer_types
    extra = {}
    if mamba:
        extra = {"olmo_hybrid_note": MAMBA2_NOTE, "mamba_num_heads": cfg.mamba_heads,
                 **{key: getattr(cfg, field) for key, field in MAMBA2_FIELDS.items()}}
    return {
        "architectures": ["OlmoHybridMamba2ForCausalLM" if mamba else "OlmoHybridForCausalLM"],
        "model_type": MAMBA2_MODEL_TYPE if mamba else "olmo_hybrid",
        **{key: getattr(cfg, field) for key, (field, _) in SIMPLE_FIELDS.items()},
        "num_key_value_heads": cfg.n_kv_heads,
        "hidden_act": "silu",
        # Written explicitly, null for NoPE, so transformers does not fall back to theta=10000.
        "rope_parameters": rope_to_hf(cfg),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "layer_types": [inv[t] for t in cfg.layer_types],
        "linear_num_key_heads": cfg.gdn_heads,
        "linear_num_value_heads": cfg.gdn_v_heads,
        "linear_key_head_dim": cfg.gdn_head_k,
        "linear_value_head_dim": cfg.gdn_head_v,
        "dtype": str(dtype).removeprefix("torch."),
        **extra,
    }
