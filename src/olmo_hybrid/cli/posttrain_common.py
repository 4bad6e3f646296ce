"""What ``olmo-hybrid sft`` and ``olmo-hybrid dpo`` share: their arguments, the config they build and the run.

Errors are raised (``olmo_hybrid.errors``) and the dispatcher prints them as one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from olmo_hybrid.cli import ArgumentParser
from olmo_hybrid.config import to_dict


def build_parser(kind: str, doc: str, examples: str) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=f"olmo-hybrid {kind}", description=doc, epilog=examples,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="training run directory or Hugging Face checkpoint to start from")
    p.add_argument("data", help="JSONL file (or datasets dataset) of " +
                   ("conversations" if kind == "sft" else "preference pairs"))
    p.add_argument("args", nargs="*", metavar="CONFIG.json | section.field=value",
                   help="an optional JSON config (partial; merged over the recipe), then dotted overrides")
    p.add_argument("--out", default=None, help=f"run directory (default: runs/{kind})")
    p.add_argument("--val", default=None, help="held-out examples (default: data.val_fraction of DATA)")
    p.add_argument("--chat-template", default=None, help="a .jinja file or a Jinja string (default: the source "
                                                         "tokenizer's template, else ours)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run, deleting its checkpoints, export and metrics")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config (before the source and data "
                                                          "are read) and exit")
    return p


def run_posttrain(kind: str, argv: list[str], doc: str, examples: str) -> int:
    from olmo_hybrid.posttrain.config import DPOConfig, SFTConfig, build_posttrain_config

    args = build_parser(kind, doc, examples).parse_intermixed_args(argv)
    overrides = list(args.args)
    config_file = overrides.pop(0) if overrides and "=" not in overrides[0] else None
    overrides.append(f"data.path={args.data}")
    if args.val:
        overrides.append(f"data.val_path={args.val}")
    if args.chat_template is not None:
        overrides.append(f"chat.template={args.chat_template}")
    cfg = build_posttrain_config(SFTConfig if kind == "sft" else DPOConfig, config_file, overrides)
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    from olmo_hybrid.distributed import destroy

    if kind == "sft":
        from olmo_hybrid.posttrain.trainer import run_sft as run
    else:
        from olmo_hybrid.posttrain.dpo import run_dpo as run
    try:
        run(cfg, args.source, Path(args.out or f"runs/{kind}"), resume=args.resume, overwrite=args.overwrite)
    finally:
        destroy()
    return 0
