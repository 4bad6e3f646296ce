"""``olmo-hybrid info PRESET_OR_DIR``: sizes, training FLOPs and inference memory, beside an all-attention twin."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from olmo_hybrid.cli import ArgumentParser
from olmo_hybrid.config import MODEL_PRESETS, ModelConfig, model_preset
from olmo_hybrid.errors import UsageError
from olmo_hybrid.model.cache import cache_bytes_per_sequence


def resolve_config(name_or_dir: str) -> ModelConfig:
    """A preset name, a HF checkpoint directory, or a training run directory."""
    if name_or_dir in MODEL_PRESETS:
        return model_preset(name_or_dir)
    from olmo_hybrid.checkpoint import read_model_config

    if not Path(name_or_dir).exists():
        raise UsageError(f"'{name_or_dir}' is neither a preset ({', '.join(MODEL_PRESETS)}) nor an existing "
                         "checkpoint directory")
    return read_model_config(name_or_dir)


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size or unit == "KiB":
            return f"{n / size:,.3f} {unit}" if unit == "GiB" else f"{n / size:,.2f} {unit}"


def summarize(cfg: ModelConfig, seq_len: int, context: int, kv_bytes: int) -> dict:
    mem = cache_bytes_per_sequence(cfg, context, kv_bytes)
    return {
        "layer_pattern": "".join(cfg.layer_types),
        "params_total": cfg.num_params(),
        "params_non_embedding": cfg.num_params(embeddings=False),
        "train_flops_per_token": cfg.flops_per_token(seq_len),
        "inference_bytes_per_sequence": mem,
    }


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="olmo-hybrid info", description=__doc__)
    p.add_argument("model", help=f"preset ({', '.join(MODEL_PRESETS)}) or checkpoint directory")
    p.add_argument("--seq-len", type=int, default=8192, help="training sequence length for FLOPs/token")
    p.add_argument("--context", type=int, default=65536, help="context length for inference memory")
    p.add_argument("--kv-bytes", type=int, default=2, help="bytes per KV/conv element (2 = bf16)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    for flag in ("seq_len", "context", "kv_bytes"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    cfg = resolve_config(args.model)
    twin = dataclasses.replace(cfg, layer_pattern="A")
    rows = {"model": summarize(cfg, args.seq_len, args.context, args.kv_bytes),
            "all-attention": summarize(twin, args.seq_len, args.context, args.kv_bytes)}
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    a, b = rows["model"], rows["all-attention"]
    ma, mb = a["inference_bytes_per_sequence"], b["inference_bytes_per_sequence"]
    mamba = f", {cfg.n_mamba_layers} Mamba2" if cfg.n_mamba_layers else ""
    print(f"{args.model}: {cfg.n_layers} layers ({cfg.n_gdn_layers} GDN, {cfg.n_attn_layers} attention{mamba}), "
          f"d_model {cfg.d_model}, vocab {cfg.vocab_size}")
    print(f"{'':34}{'this model':>18}{'all-attention':>18}")
    line = "{:34}{:>18}{:>18}"
    print(line.format("parameters (total)", f"{a['params_total']:,}", f"{b['params_total']:,}"))
    print(line.format("parameters (non-embedding)", f"{a['params_non_embedding']:,}", f"{b['params_non_embedding']:,}"))
    print(line.format(f"train FLOPs/token @ {args.seq_len}", f"{a['train_flops_per_token']:.4g}",
                      f"{b['train_flops_per_token']:.4g}"))
    print(f"inference memory per sequence @ {args.context} tokens:")
    for key in ("kv_cache", "gdn_state", "mamba_state", "conv_state", "total"):
        print(line.format(f"  {key}", human_bytes(ma[key]), human_bytes(mb[key])))
    return 0
