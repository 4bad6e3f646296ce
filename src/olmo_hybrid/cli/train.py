"""``olmo-hybrid train [CONFIG.json] [section.field=value ...] [options]``.

With no arguments: the ``tiny`` recipe (a 4-layer hybrid on the bundled Shakespeare corpus), then
a validation loss against the unigram baseline, a Hugging Face export and a sample.

Under ``torchrun --nproc-per-node=N -m olmo_hybrid.train ...`` (or ``torchrun ... $(which olmo-hybrid)
train ...``) the same command trains on N processes with FSDP2; only rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from olmo_hybrid.cli import ArgumentParser
from olmo_hybrid.config import to_dict

EXAMPLES = """examples:
  olmo-hybrid train                                    # tiny hybrid on the bundled corpus (CPU: minutes)
  olmo-hybrid train model.layer_pattern=A              # the same recipe as a transformer
  olmo-hybrid train model.layer_pattern=GGGA optim.lr=3e-3 --steps 200 --out runs/try
  olmo-hybrid train my_config.json trainer.seed=1 --out runs/seed1
  olmo-hybrid train --out runs/try --resume            # continue from the newest valid checkpoint
  olmo-hybrid train --out runs/try --overwrite         # start that run over (deletes its checkpoints)
  torchrun --nproc-per-node=8 -m olmo_hybrid.train my_data.json --model 1b --out runs/1b trainer.compile=true \\
      trainer.activation_checkpointing=selective trainer.loss_chunk_tokens=8192   # FSDP2 on 8 GPUs
"""


def build_parser() -> argparse.ArgumentParser:
    from olmo_hybrid.train.config import TRAIN_PRESETS

    p = ArgumentParser(prog="olmo-hybrid train", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("args", nargs="*", metavar="CONFIG.json | section.field=value",
                   help="an optional JSON config (may be partial; merged over the preset), then dotted overrides")
    p.add_argument("--preset", default="tiny", choices=sorted(TRAIN_PRESETS), help="base recipe (default: tiny)")
    p.add_argument("--model", help="a model preset (60m ... 1b, olmo-hybrid-7b; see `olmo-hybrid info`) replacing "
                                   "the recipe's model before overrides")
    steps = ", ".join(f"{preset()['trainer']['steps']} for {name}" for name, preset in TRAIN_PRESETS.items())
    p.add_argument("--steps", type=int, help=f"shorthand for trainer.steps=N (default: the preset's, {steps})")
    p.add_argument("--out", default=None, help="run directory (default: runs/PRESET)")
    p.add_argument("--save-interval", type=int,
                   help="shorthand for trainer.save_interval=N (default: 0, only at the end)")
    p.add_argument("--device", help="shorthand for trainer.device=... (auto, cpu, cuda, cuda:1; default: auto)")
    p.add_argument("--seed", type=int, help="shorthand for trainer.seed=N (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run, deleting its checkpoints, export and metrics")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from olmo_hybrid.train.config import build_config

    config_file = None
    overrides = list(args.args)
    if overrides and "=" not in overrides[0]:
        config_file = overrides.pop(0)
    for flag, key in (("steps", "trainer.steps"), ("save_interval", "trainer.save_interval"),
                      ("device", "trainer.device"), ("seed", "trainer.seed")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    cfg = build_config(config_file, overrides, preset=args.preset, model=args.model)
    out = Path(args.out or f"runs/{args.preset}")
    if os.environ.get("RANK", "0") == "0":
        print("resolved config:")
        print(json.dumps(to_dict(cfg), indent=2))
    if args.dry_run:
        return 0
    from olmo_hybrid.distributed import destroy
    from olmo_hybrid.train.trainer import train

    try:
        train(cfg, out, resume=args.resume, overwrite=args.overwrite)
    finally:
        destroy()
    return 0
