"""``olmo-hybrid generate CHECKPOINT --prompt TEXT``: stream a continuation to stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from olmo_hybrid.model.generate import stream_generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model_and_tokenizer(path: str, dtype: torch.dtype | None = None, device: str | None = None):
    """A HF checkpoint directory or a training run directory -> (model, tokenizer or None).

    A HF directory without tokenizer.json gets the bundled dolma2 tokenizer when its vocabulary has
    dolma2's padded size, and no tokenizer otherwise.
    """
    from olmo_hybrid.data import load_tokenizer
    from olmo_hybrid.model import HybridLM

    p = Path(path)
    if (p / "config.json").is_file():
        model = HybridLM.from_pretrained(p, dtype=dtype, device=device)
        if (p / "tokenizer.json").is_file():
            return model, load_tokenizer(p)
        dolma2 = load_tokenizer("dolma2")
        return model, dolma2 if model.config.vocab_size == dolma2.padded_vocab_size() else None
    if p.is_dir():
        from olmo_hybrid.train.checkpoint import load_model_from_run

        model, tok = load_model_from_run(p)
        return model.to(device=device or "cpu", dtype=dtype or torch.float32), tok
    raise SystemExit(f"olmo-hybrid generate: checkpoint directory '{path}' does not exist")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="olmo-hybrid generate", description=__doc__)
    p.add_argument("checkpoint", help="HF-format checkpoint directory or training run directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model, tok = load_model_and_tokenizer(args.checkpoint, dtype, args.device)
    model.eval()
    if tok is None:
        raise SystemExit(f"olmo-hybrid generate: {args.checkpoint} has no tokenizer.json and its vocabulary "
                         f"({model.config.vocab_size}) is not dolma2's")
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
