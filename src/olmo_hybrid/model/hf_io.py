"""Hugging Face ``olmo_hybrid`` checkpoints: config.json <-> ModelConfig, and safetensors weights.

Our module names are the checkpoint's names, so loading is a copy after a rename table that accepts the
variants found in the wild (listed in docs/architecture.md): older HF norm names, OLMo-core's exporter names
(``out_proj``/``norm``), transformers' fused ``conv1d``, and OLMo-core state-dict names (``blocks.N...``).

A model with Mamba2 layers (pattern letter ``M``) is saved in the same layout but in this project's own format,
``model_type: olmo_hybrid_mamba2`` (layer type ``mamba2``, ``mamba_*`` fields, tensors
``model.layers.N.mixer.*`` as transformers' Mamba2Mixer names them), because transformers' ``olmo_hybrid`` has
no Mamba2 layer: its config carries a note saying so, and transformers refuses the unknown model type instead of
building something else.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from olmo_hybrid.config import ATTN, GDN, MAMBA, ConfigError, ModelConfig, coerce_field, read_json_object
from olmo_hybrid.fsio import default_permissions
from olmo_hybrid.model.hybrid import HybridLM

log = logging.getLogger(__name__)

MAMBA2_MODEL_TYPE = "olmo_hybrid_mamba2"  # our own format: patterns with Mamba2 layers
MODEL_TYPES = ("olmo_hybrid", "olmo3_5_hybrid", "olmo3_2_hybrid", MAMBA2_MODEL_TYPE)
_LAYER_TYPE = {"linear_attention": GDN, "full_attention": ATTN, "mamba2": MAMBA}
MAMBA2_NOTE = ("Written by olmo-hybrid for a layer pattern with Mamba2 layers ('mamba2' in layer_types), which "
               "transformers' olmo_hybrid model does not implement: this is olmo-hybrid's own format. Load it with "
               "olmo_hybrid.model.HybridLM.from_pretrained; transformers' AutoModel refuses the model type.")
# config.json settings with one implemented value (None: the key may be absent or null); any other is refused by name.
_FIXED_SETTINGS = {"hidden_act": ("silu", None), "attention_bias": (False, None), "mlp_bias": (False, None),
                   "sliding_window": (None,), "use_sliding_window": (False, None)}
# config.json key -> ModelConfig field, for the Mamba2 layers (transformers' Mamba2Config names, prefixed).
_MAMBA2_FIELDS = {"mamba_expand": "mamba_expand", "mamba_head_dim": "mamba_head_dim",
                  "mamba_state_size": "mamba_state_size", "mamba_n_groups": "mamba_n_groups",
                  "mamba_conv_kernel": "mamba_conv_size", "mamba_chunk_size": "mamba_chunk_size",
                  "mamba_use_bias": "mamba_proj_bias", "mamba_use_conv_bias": "mamba_conv_bias"}


# --------------------------------------------------------------------------------------------------
# config.json


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    if d.get("model_type") not in MODEL_TYPES:
        raise ConfigError(f"{source}: model_type must be one of {MODEL_TYPES}, got {d.get('model_type')!r}")

    def need(key):
        if key not in d or d[key] is None:
            raise ConfigError(f"{source}: missing required field '{key}'")
        return d[key]

    n_layers, d_model, n_heads = need("num_hidden_layers"), need("hidden_size"), need("num_attention_heads")
    for key, allowed in _FIXED_SETTINGS.items():
        if d.get(key) not in allowed:
            implemented = [repr(a) for a in allowed if a is not None]
            raise ConfigError(f"{source}: {key}={d[key]!r} is not supported (olmo_hybrid implements "
                              f"{' or '.join(implemented) if implemented else 'none: leave it null or absent'})")
    head_dim = d.get("head_dim")
    if head_dim is not None and isinstance(n_heads, int) and n_heads > 0 and head_dim * n_heads != d_model:
        raise ConfigError(f"{source}: head_dim={head_dim!r} is not supported: olmo_hybrid's attention heads are "
                          f"hidden_size / num_attention_heads = {d_model} / {n_heads} wide")
    layer_types = d.get("layer_types") or [
        "full_attention" if i % 4 == 3 else "linear_attention" for i in range(n_layers)]
    unknown = sorted(set(layer_types) - set(_LAYER_TYPE))
    if unknown:
        raise ConfigError(f"{source}: layer_types has unsupported entries {unknown} (expected {list(_LAYER_TYPE)})")
    if ("mamba2" in layer_types) != (d["model_type"] == MAMBA2_MODEL_TYPE):
        raise ConfigError(f"{source}: layer type 'mamba2' goes with model_type '{MAMBA2_MODEL_TYPE}' (this project's "
                          f"format) and only with it; got model_type {d['model_type']!r} with layer types "
                          f"{sorted(set(layer_types))}")
    if len(layer_types) != n_layers:
        raise ConfigError(f"{source}: layer_types has {len(layer_types)} entries, num_hidden_layers={n_layers}")
    gdn_heads = d.get("linear_num_key_heads") or n_heads
    head_k = d.get("linear_key_head_dim") or int(0.75 * d_model / gdn_heads)
    mamba = {field: d[key] for key, field in _MAMBA2_FIELDS.items() if d.get(key) is not None}
    cfg = ModelConfig(
        vocab_size=need("vocab_size"), d_model=d_model, n_layers=n_layers,
        layer_pattern="".join(_LAYER_TYPE[t] for t in layer_types),
        n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads"), **rope_from_hf(d, source),
        gdn_heads=gdn_heads, gdn_v_heads=d.get("linear_num_value_heads"), gdn_head_k=head_k,
        gdn_head_v=d.get("linear_value_head_dim") or 2 * head_k,
        gdn_conv_size=d.get("linear_conv_kernel_dim", 4),
        gdn_allow_neg_eigval=d.get("linear_allow_neg_eigval", True),
        mlp_hidden=need("intermediate_size"), norm_eps=d.get("rms_norm_eps", 1e-6),
        max_seq_len=d.get("max_position_embeddings", 65536),
        tie_embeddings=d.get("tie_word_embeddings", False), init_std=d.get("initializer_range", 0.02), **mamba,
    )
    heads = d.get("mamba_num_heads")
    if heads is not None and heads != cfg.mamba_heads:
        raise ConfigError(f"{source}: mamba_num_heads={heads} disagrees with mamba_expand * hidden_size / "
                          f"mamba_head_dim = {cfg.mamba_heads}")
    return cfg


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
    original length is max_position_embeddings).

    One deliberate difference: a missing or null rope_theta means NoPE, not transformers' silent default of 10000
    (the released checkpoints were trained without RoPE at the end; docs/architecture.md), and with NoPE every
    other rope setting is moot, as in transformers. A rope type we do not implement passes through to be refused by
    the model by name; a setting of an implemented type we do not implement (an unknown key, a partial rotary
    factor) is refused here.
    """
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: {key} must be a JSON object, got {params!r}")
    if "rope_type" not in params and "type" not in params and {"full_attention", "linear_attention"} & set(params):
        raise ConfigError(f"{source}: {key} given per layer type is not supported (olmo_hybrid takes one dict)")
    theta = params.get("rope_theta", d.get("rope_theta"))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if theta is None:
        return {"rope_theta": None, "rope_type": "default"}
    if rope_type not in _ROPE_KEYS:
        return {"rope_theta": theta, "rope_type": rope_type}
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


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype, eos_token_id=None, pad_token_id=None,
                 bos_token_id=None) -> dict:
    cfg = cfg.resolved()
    inv = {v: k for k, v in _LAYER_TYPE.items()}
    mamba = MAMBA in cfg.layer_types
    extra = {}
    if mamba:
        extra = {"olmo_hybrid_note": MAMBA2_NOTE, "mamba_num_heads": cfg.mamba_heads,
                 **{key: getattr(cfg, field) for key, field in _MAMBA2_FIELDS.items()}}
    return {
        "architectures": ["OlmoHybridMamba2ForCausalLM" if mamba else "OlmoHybridForCausalLM"],
        "model_type": MAMBA2_MODEL_TYPE if mamba else "olmo_hybrid",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        # Written explicitly, null for NoPE, so transformers does not fall back to theta=10000.
        "rope_parameters": rope_to_hf(cfg),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "layer_types": [inv[t] for t in cfg.layer_types],
        "linear_num_key_heads": cfg.gdn_heads,
        "linear_num_value_heads": cfg.gdn_v_heads,
        "linear_key_head_dim": cfg.gdn_head_k,
        "linear_value_head_dim": cfg.gdn_head_v,
        "linear_conv_kernel_dim": cfg.gdn_conv_size,
        "linear_allow_neg_eigval": cfg.gdn_allow_neg_eigval,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id,
        "dtype": str(dtype).removeprefix("torch."),
        **extra,
    }


# --------------------------------------------------------------------------------------------------
# tensor names

# Suffix renames that do not depend on the layer type.
_SUFFIX_ALIASES = [
    (".attention_layer_norm.weight", ".input_layernorm.weight"),
    (".feedforward_layer_norm.weight", ".post_attention_layernorm.weight"),
    (".linear_attn.out_proj.weight", ".linear_attn.o_proj.weight"),
    (".linear_attn.norm.weight", ".linear_attn.o_norm.weight"),
]
# OLMo-core names, per layer type: (pattern after 'blocks.N.', HF name after 'model.layers.N.').
_OLMO_CORE_GDN = {
    **{f"fla.inner.{p}_proj.weight": f"linear_attn.{p}_proj.weight" for p in "qkvabgo"},
    **{f"attention.w_{p}.weight": f"linear_attn.{p}_proj.weight" for p in "qkvabg"},
    "attention.w_out.weight": "linear_attn.o_proj.weight",
    **{f"{pre}{p}_conv1d.weight": f"linear_attn.{p}_conv1d.weight" for p in "qkv" for pre in ("fla.inner.", "attention.")},
    **{f"{pre}{p}": f"linear_attn.{p}" for p in ("o_norm.weight", "A_log", "dt_bias") for pre in ("fla.inner.", "attention.")},
    "fla_norm.weight": "input_layernorm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "feed_forward_norm.weight": "post_attention_layernorm.weight",
}
_OLMO_CORE_ATTN = {
    **{f"attention.w_{p}.weight": f"self_attn.{p}_proj.weight" for p in "qkv"},
    "attention.w_out.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "post_attention_layernorm.weight",
    "feed_forward_norm.weight": "post_feedforward_layernorm.weight",
}
_OLMO_CORE_MLP = {"feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
                  "feed_forward.w3.weight": "mlp.up_proj.weight"}
_OLMO_CORE_TOP = {"embeddings.weight": "model.embed_tokens.weight", "lm_head.norm.weight": "model.norm.weight",
                  "lm_head.w_out.weight": "lm_head.weight"}


def canonical_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename any accepted variant to our (= current HF) names; split transformers' fused conv."""
    out: dict[str, torch.Tensor] = {}
    key_dim = cfg.gdn_heads * cfg.gdn_head_k
    for name, t in tensors.items():
        if name in _OLMO_CORE_TOP:
            name = _OLMO_CORE_TOP[name]
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            table = {**_OLMO_CORE_MLP, **(_OLMO_CORE_ATTN if _kind(cfg, i, name) == ATTN else _OLMO_CORE_GDN)}
            if rest not in table:
                raise ValueError(f"checkpoint tensor '{name}' is not a known OLMo-core name")
            name = f"model.layers.{i}.{table[rest]}"
        if re.match(r"(layers\.|embed_tokens\.|norm\.)", name):
            name = "model." + name  # saved from the base model without the LM wrapper
        for old, new in _SUFFIX_ALIASES:
            if name.endswith(old):
                name = name[: -len(old)] + new
        if name.endswith(".linear_attn.conv1d.weight"):
            prefix = name[: -len("conv1d.weight")]
            q, k, v = t.split([key_dim, key_dim, t.shape[0] - 2 * key_dim], dim=0)
            out.update({prefix + "q_conv1d.weight": q, prefix + "k_conv1d.weight": k, prefix + "v_conv1d.weight": v})
            continue
        out[name] = t
    _fix_evenly_split_convs(out, cfg)
    return out


def _fix_evenly_split_convs(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Undo transformers 5.23's save of its fused conv: it writes q/k/v_conv1d as three equal chunks of
    cat(q, k, v) (e.g. 86/86/84 rows instead of 64/64/128), and re-concatenates them on load."""
    cfg = cfg.resolved()
    key_dim, val_dim = cfg.gdn_heads * cfg.gdn_head_k, cfg.gdn_v_heads * cfg.gdn_head_v
    for name in [n for n in sd if n.endswith(".linear_attn.q_conv1d.weight")]:
        prefix = name[: -len("q_conv1d.weight")]
        parts = [sd.get(prefix + f"{p}_conv1d.weight") for p in "qkv"]
        if any(p is None for p in parts):
            continue
        rows = [p.shape[0] for p in parts]
        if rows != [key_dim, key_dim, val_dim] and sum(rows) == 2 * key_dim + val_dim:
            q, k, v = torch.cat(parts, dim=0).split([key_dim, key_dim, val_dim], dim=0)
            sd[prefix + "q_conv1d.weight"], sd[prefix + "k_conv1d.weight"], sd[prefix + "v_conv1d.weight"] = q, k, v


def _kind(cfg: ModelConfig, i: int, name: str) -> str:
    if i >= cfg.n_layers:
        raise ValueError(f"checkpoint tensor '{name}' refers to layer {i}, but the model has {cfg.n_layers} layers")
    return cfg.layer_types[i]


# --------------------------------------------------------------------------------------------------
# load / save


def read_config(path: Path) -> ModelConfig:
    f = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} " + ("is a file" if path.exists() else "does not exist"))
    if not f.is_file():
        raise FileNotFoundError(f"{path} has no config.json (expected a Hugging Face olmo_hybrid checkpoint)")
    d = read_json_object(f, what="checkpoint config")
    if "model_type" not in d and {"model", "trainer"} <= set(d):
        raise ConfigError(f"{f} is a training run's config, not a Hugging Face checkpoint's: load the run with "
                          "olmo_hybrid.checkpoint.load_model_and_tokenizer (or use its hf/ export)")
    return config_from_hf(d, source=str(f))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    tensors = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: shard {name} named in the index is missing")
        tensors.update(load_file(str(path / name)))
    return tensors


def load_pretrained(path, dtype: torch.dtype | None = None, device=None, strict: bool = True) -> HybridLM:
    """Load a HF-format checkpoint directory into a ``HybridLM`` (fp32 unless ``dtype`` is given)."""
    path = Path(path)
    cfg = read_config(path)
    tensors = canonical_state_dict(_read_tensors(path), cfg)
    dtype = dtype or torch.float32
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
    with torch.device("meta"):
        model = HybridLM(cfg, init=False)
    expected = model.state_dict()
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
        head, embed = tensors.pop("lm_head.weight", None), tensors.get("model.embed_tokens.weight")
        if head is not None and embed is not None and not torch.equal(head, embed):
            raise ValueError(f"{path}: tie_word_embeddings is true but lm_head.weight differs from "
                             "model.embed_tokens.weight (loading would drop the trained LM head)")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(f"{path}: checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
    if unexpected and strict:
        raise ValueError(f"{path}: checkpoint has {len(unexpected)} unexpected tensor(s): "
                         f"{', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, "
                             f"the config implies {tuple(ref.shape)}")
    for name in expected:
        t = tensors[name]
        if not t.is_floating_point():
            raise ValueError(f"{path}: tensor '{name}' is stored as {t.dtype}, expected a floating-point dtype")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor '{name}' holds non-finite values (NaN or inf): the checkpoint is "
                             "damaged or from a diverged run")
    state = {n: tensors[n].to(device=device or "cpu", dtype=dtype) for n in expected}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def save_pretrained(model: HybridLM, path, dtype: torch.dtype | None = None, tokenizer=None,
                    max_shard_bytes: int = 5 * 1024**3, eos_token_id=None, pad_token_id=None) -> None:
    """Write config.json + safetensors (sharded above ``max_shard_bytes``) that transformers loads (patterns with
    Mamba2 layers: this project's own format, see the module docstring).

    Files are written to a temporary directory and moved into place, so an interrupted save never
    leaves a half-written checkpoint behind under the final names.
    """
    from safetensors.torch import save_file

    cfg = model.config
    if MAMBA in cfg.layer_types:
        log.warning("layer pattern %r has Mamba2 layers: saving in olmo-hybrid's own format (model_type %s), "
                    "which transformers cannot load", cfg.layer_pattern, MAMBA2_MODEL_TYPE)
    elif GDN not in cfg.layer_types or ATTN not in cfg.layer_types:
        log.warning("layer pattern %r has no %s layer: transformers' OlmoHybridForCausalLM will refuse it",
                    cfg.layer_pattern, "GDN" if GDN not in cfg.layer_types else "attention")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {n: t.detach().to("cpu", dtype or t.dtype).contiguous() for n, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    out_dtype = dtype or next(iter(state.values())).dtype
    if tokenizer is not None:
        eos_token_id = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-save-", dir=path))
    try:
        names = []
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            default_permissions(tmp / fname)
            names.append(fname)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": {n: names[i] for i, s in enumerate(shards) for n in s}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf = config_to_hf(cfg, out_dtype, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        for f in tmp.iterdir():
            os.replace(f, path / f.name)
        stale = [f for f in path.glob("model*.safetensors*") if f.name not in names
                 and f.name != "model.safetensors.index.json"]
        if len(shards) == 1:
            stale += [f for f in [path / "model.safetensors.index.json"] if f.exists()]
        for f in stale:
            f.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
