"""``olmo-hybrid generate CHECKPOINT --prompt TEXT``: stream a continuation to stdout."""

from __future__ import annotations

import argparse
import sys

import torch

from olmo_hybrid.loading import load_checkpoint
from olmo_hybrid.model.generate import stream_generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="olmo-hybrid generate", description=__doc__)
    p.add_argument("checkpoint", help="HF-format checkpoint directory or training run directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer (dolma2, file or dir)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model, tok = load_checkpoint(args.checkpoint, device=args.device, dtype=dtype, tokenizer=args.tokenizer)
    ids = torch.tensor([tok.encode(args.prompt)], device=args.device)
    if ids.shape[1] == 0:
        raise SystemExit("olmo-hybrid generate: the prompt encodes to zero tokens")
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    new: list[int] = []
    shown = ""
    for token in stream_generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, eos_token_id=tok.eos_token_id, generator=gen):
        if tok.eos_token_id is not None and int(token[0]) == tok.eos_token_id:
            break
        new.append(int(token[0]))
        text = tok.decode(new)
        # Print only complete characters: a partial UTF-8 sequence decodes to U+FFFD until finished.
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write("\n")
    return 0
