"""``olmo-hybrid extend SOURCE --method yarn|drope|none --seq-len L [--out DIR] [section.field=value ...]``.

Continues a training run directory or Hugging Face checkpoint at a longer context in a new run directory, as
OLMo Hybrid's long-context stage did: positions changed by the method (drope: RoPE removed from every attention
layer; yarn: YaRN with beta 32/1 and factor L / original length; none: unchanged), the same tokens per step in
longer sequences, warmup then a linear decay to 0. Everything else comes from the source run's recipe and the
dotted overrides (data.path, optim.lr, data.doc_masking, trainer.activation_checkpointing, trainer.loss_chunk_tokens,
parallel.*, ...). Under torchrun the stage trains with FSDP2 like `olmo-hybrid train`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from olmo_hybrid.cli import ArgumentParser

EXAMPLES = """examples:
  olmo-hybrid extend runs/base --method drope --seq-len 4096 --tokens 50_000_000 --out runs/base-drope4k
  olmo-hybrid extend runs/base --method yarn --seq-len 4096 --steps 500 optim.lr=2e-4 data.doc_masking=true
  olmo-hybrid extend runs/base --method drope --seq-len 4096 --recalibrate --steps 100   # DroPE's own recipe:
      # recalibrate at the original length, then use the 4096 window zero-shot (or extend that run again)
  olmo-hybrid extend hf/Olmo-Hybrid-7B-stage2 --method drope --seq-len 65536 --steps 23842 data.path=data/lc \\
      trainer.activation_checkpointing=full trainer.loss_chunk_tokens=8192        # the paper's stage 3 shape
  olmo-hybrid extend runs/base --method yarn --seq-len 4096 --steps 500 --out runs/x --resume   # continue it
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="olmo-hybrid extend", description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("source", help="training run directory or Hugging Face checkpoint")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="training config overrides")
    p.add_argument("--method", required=True, choices=["yarn", "drope", "none"], help="how positions change")
    p.add_argument("--seq-len", type=int, required=True, help="the extended model's window (tokens)")
    p.add_argument("--out", default=None,
                   help="new run directory (default: SOURCE-METHODSEQLEN beside SOURCE, e.g. runs/base-drope4096)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimizer steps of the stage")
    g.add_argument("--tokens", type=int, help="token budget of the stage (steps = tokens / tokens per step)")
    p.add_argument("--train-len", type=int, default=None, help="sequence length to train at (default: --seq-len)")
    p.add_argument("--recalibrate", action="store_true",
                   help="DroPE's recipe: train at the source's original length (with --method drope)")
    p.add_argument("--original-len", type=int, default=None,
                   help="length the source's positions were trained at (default: a YaRN source's original "
                        "length for --method yarn, else its run's data.seq_len, else its window)")
    p.add_argument("--device", help="shorthand for trainer.device=...")
    p.add_argument("--resume", action="store_true", help="continue the stage in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start the stage in --out over")
    p.add_argument("--skip-memory-check", action="store_true", help="run even when estimated not to fit the device")
    p.add_argument("--dry-run", action="store_true", help="print the stage's resolved config and stop")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from olmo_hybrid.config import to_dict
    from olmo_hybrid.distributed import destroy
    from olmo_hybrid.longctx.extend import extend, plan_extension

    overrides = list(args.overrides) + ([f"trainer.device={args.device}"] if args.device else [])
    out = Path(args.out) if args.out else Path(f"{str(args.source).rstrip('/')}-{args.method}{args.seq_len}")
    kwargs = dict(steps=args.steps, tokens=args.tokens, train_len=args.train_len, recalibrate=args.recalibrate,
                  original_len=args.original_len, overrides=overrides)
    if args.dry_run:
        plan = plan_extension(args.source, args.method, args.seq_len, **kwargs)
        print(json.dumps({"extend": plan.record(), "config": to_dict(plan.config)}, indent=2))
        return 0
    try:
        extend(args.source, out, args.method, args.seq_len, resume=args.resume, overwrite=args.overwrite,
               check_memory=not args.skip_memory_check, log=print if os.environ.get("RANK", "0") == "0" else
               (lambda *_: None), **kwargs)
    finally:
        destroy()
    return 0
