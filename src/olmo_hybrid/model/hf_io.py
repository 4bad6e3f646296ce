"""Hugging Face ``olmo_hybrid`` checkpoints: safetensors weights (config.json: ``model/hf_config.py``).

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

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from olmo_hybrid.config import ATTN, GDN, MAMBA, ConfigError, ModelConfig, read_json_object
from olmo_hybrid.fsio import default_permissions
from olmo_hybrid.model.hf_config import MAMBA2_MODEL_TYPE, config_from_hf, config_to_hf
from olmo_hybrid.model.hybrid import HybridLM

log = logging.getLogger(__name__)


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


def weight_files(path: Path) -> tuple[list[str], dict | None]:
    """The safetensors files transformers would read in ``path``, and the index's weight map (None for one file):
    ``model.safetensors`` when present (transformers prefers it to an index beside it), else the index's shards."""
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"], None
    if not index.is_file():
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    weight_map = read_json_object(index, what="checkpoint index", error=ValueError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index}: expected a 'weight_map' object of tensor name -> shard file")
    return sorted(set(weight_map.values())), weight_map


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files, weight_map = weight_files(path)
    tensors = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: shard {name} named in the index is missing")
        shard = load_file(str(path / name))
        if weight_map is not None:
            absent = sorted(t for t, f in weight_map.items() if f == name and t not in shard)
            if absent:
                raise ValueError(f"{path}: shard {name} lacks tensor '{absent[0]}' that model.safetensors.index.json "
                                 "places there")
        tensors.update(shard)
    # transformers drops multi-token-prediction heads on load (_keys_to_ignore_on_load_unexpected): so do we
    return {n: t for n, t in tensors.items() if not n.startswith("mtp")}


def load_pretrained(path, dtype: torch.dtype | None = None, device=None, strict: bool = True) -> HybridLM:
    """Load a HF-format checkpoint directory into a ``HybridLM`` (fp32 unless ``dtype`` is given)."""
    path = Path(path)
    cfg = read_config(path)
    tensors = canonical_state_dict(_read_tensors(path), cfg)
    cfg = _tie_as_transformers(cfg, tensors, path)
    dtype = dtype or torch.float32
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
    with torch.device("meta"):
        model = HybridLM(cfg, init=False)
    expected = model.state_dict()
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
        tensors.pop("lm_head.weight", None)
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


def _tie_as_transformers(cfg: ModelConfig, tensors: dict[str, torch.Tensor], path: Path) -> ModelConfig:
    """transformers' reading of ``tie_word_embeddings`` against the tensors present: a checkpoint holding both the
    embedding and a *different* LM head loads untied (its config is wrong; dropping the head would change every
    logit), and one holding only the LM head ties the embedding to it."""
    if not cfg.tie_embeddings:
        return cfg
    head, embed = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if head is not None and embed is None:
        tensors["model.embed_tokens.weight"] = head
    elif head is not None and not torch.equal(head, embed):
        log.warning("%s: config.json ties the embeddings, but lm_head.weight and model.embed_tokens.weight differ: "
                    "loading them untied, as transformers does (write tie_word_embeddings false to silence this)", path)
        return dataclasses.replace(cfg, tie_embeddings=False)
    return cfg


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
    # Token ids: given here, else the model's (a loaded checkpoint's), else the tokenizer's.
    ids = {}
    for name, given in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        value = next((v for v in (given, getattr(cfg, name), getattr(tokenizer, name, None)) if v is not None), None)
        if value is not None:
            ids[name] = value
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
        hf = config_to_hf(dataclasses.replace(cfg, **ids), out_dtype)
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
