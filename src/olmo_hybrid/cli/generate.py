"""``olmo-hybrid generate CHECKPOINT --prompt TEXT``: stream a continuation to stdout, through the serving engine."""

from __future__ import annotations

import argparse
import sys

import torch

from olmo_hybrid.loading import load_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Streamer:
    """Writes the new text as tokens arrive: only complete characters (a partial UTF-8 sequence decodes to
    U+FFFD until finished), and never the last ``holdback`` characters, which may be (the start of) a stop string:
    a token reaches the streamer before the engine checks it for stops."""

    def __init__(self, tokenizer, holdback: int):
        self.tok, self.holdback = tokenizer, holdback
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, request_id: int, token: int) -> None:
        if token == self.tok.eos_token_id:
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.write_upto(text, len(text) - self.holdback)

    def write_upto(self, text: str, end: int) -> None:
        if end > self.shown:
            sys.stdout.write(text[self.shown:end])
            sys.stdout.flush()
            self.shown = end


def main(argv: list[str]) -> int:
    from olmo_hybrid.serve import Engine, SamplingParams

    p = argparse.ArgumentParser(prog="olmo-hybrid generate", description=__doc__)
    p.add_argument("checkpoint", help="HF-format checkpoint directory or training run directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user turn of the checkpoint's chat "
                                                       "template (ours if it has none) and stop at the turn's end")
    p.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer (dolma2, file or dir)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model, tok = load_checkpoint(args.checkpoint, device=args.device, dtype=dtype, tokenizer=args.tokenizer)
    if args.chat:
        from olmo_hybrid.posttrain.chat import END_OF_TURN, ChatTemplate

        ids, args.stop = ChatTemplate(tok).prompt_ids(args.prompt), args.stop + [END_OF_TURN]
    else:
        ids = tok.encode(args.prompt)
    if not ids:
        raise SystemExit("olmo-hybrid generate: the prompt encodes to zero tokens")
    if args.max_new_tokens < 1:
        raise SystemExit(f"olmo-hybrid generate: --max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    engine = Engine(model, max_batch=1, max_context=len(ids) + args.max_new_tokens, tokenizer=tok,
                    cuda_graphs=args.device.startswith("cuda"))
    streamer = _Streamer(tok, holdback=max((len(s) for s in args.stop), default=0))
    sys.stdout.write(args.prompt + ("\n" if args.chat else ""))
    engine.submit(ids, args.max_new_tokens, sampling, stop=args.stop, on_token=streamer)
    (out,) = list(engine.run_until_done())
    streamer.write_upto(out.text, len(out.text))  # the held-back tail, cut before a stop string
    sys.stdout.write("\n")
    return 0
