"""``olmo-hybrid convert SRC DST``: write a clean Hugging Face ``olmo_hybrid`` checkpoint.

SRC is a HF checkpoint directory in any accepted naming variant (older HF norm names, OLMo-core exporter
names, transformers' fused or evenly split convs, OLMo-core ``blocks.N`` names) or a training run
directory; DST gets config.json, safetensors in current names and the tokenizer when one is known. The
tensors keep SRC's dtype unless --dtype is given. DST must be new or empty, or hold another HF checkpoint
that --overwrite replaces (whole, and only once the new one is complete); convert never writes onto SRC.
``--verify`` reloads DST and checks that the logits are unchanged.
"""

from __future__ import annotations

import torch

from olmo_hybrid.cli import ArgumentParser
from olmo_hybrid.cli.generate import DTYPES
from olmo_hybrid.errors import UsageError


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.upper().strip()
    try:
        for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
            if t.endswith(unit):
                n = int(float(t[: -len(unit)]) * mult)
                break
        else:
            n = int(t)
    except ValueError:
        n = 0
    if n <= 0:
        raise UsageError(f"--max-shard-size: expected a positive size such as 5GB or 500MiB, got {text!r}")
    return n


def main(argv: list[str]) -> int:
    from olmo_hybrid.checkpoint import convert_checkpoint

    p = ArgumentParser(prog="olmo-hybrid convert", description=__doc__)
    p.add_argument("src", help="HF checkpoint directory (any accepted naming variant) or training run directory")
    p.add_argument("dst", help="output directory: new, empty, or a HF checkpoint that --overwrite replaces")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype of the written tensors (default: SRC's; a run directory's weights are fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB or 500MiB")
    p.add_argument("--overwrite", action="store_true", help="replace a HF checkpoint already in DST")
    p.add_argument("--verify", action="store_true", help="reload DST and compare logits on random tokens")
    args = p.parse_args(argv)
    model, _, dtype = convert_checkpoint(args.src, args.dst, dtype=DTYPES[args.dtype] if args.dtype else None,
                                         overwrite=args.overwrite, max_shard_bytes=_size(args.max_shard_size))
    name = next((k for k, v in DTYPES.items() if v == dtype), str(dtype))
    print(f"wrote {args.dst}: {model.num_params():,} parameters, {name}"
          + ("" if args.dtype else " (the source's dtype)"))
    if args.verify:
        from olmo_hybrid.model import HybridLM

        again = HybridLM.from_pretrained(args.dst, dtype=dtype)
        x = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            same = torch.equal(model(x), again(x))
        print("verify:", "logits identical" if same else "LOGITS DIFFER")
        return 0 if same else 1
    return 0
