"""``olmo-hybrid convert SRC DST``: write a clean Hugging Face ``olmo_hybrid`` checkpoint.

SRC is a HF checkpoint directory in any accepted naming variant (older HF norm names, OLMo-core exporter
names, transformers' fused or evenly split convs, OLMo-core ``blocks.N`` names) or a training run
directory; DST gets config.json, safetensors in current names and the tokenizer when one is known.
``--verify`` reloads DST and checks that the logits are unchanged.
"""

from __future__ import annotations

import argparse

import torch

from olmo_hybrid.cli.generate import DTYPES
from olmo_hybrid.loading import load_checkpoint


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.upper().strip()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="olmo-hybrid convert", description=__doc__)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype of the written tensors")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--verify", action="store_true", help="reload DST and compare logits on random tokens")
    args = p.parse_args(argv)
    model, tok = load_checkpoint(args.src, dtype=DTYPES[args.dtype], require_tokenizer=False)
    model.save_pretrained(args.dst, tokenizer=tok, max_shard_bytes=_size(args.max_shard_size))
    print(f"wrote {args.dst}: {model.num_params():,} parameters, {args.dtype}")
    if args.verify:
        from olmo_hybrid.model import HybridLM

        again = HybridLM.from_pretrained(args.dst, dtype=DTYPES[args.dtype])
        x = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            same = torch.equal(model(x), again(x))
        print("verify:", "logits identical" if same else "LOGITS DIFFER")
        return 0 if same else 1
    return 0
