"""``olmo-hybrid generate CHECKPOINT --prompt TEXT``: stream a continuation to stdout, through the engine.

The engine and sampler are the ones ``HybridLM.generate`` and the trainer's end-of-run sample use, so
``--seed S --temperature T --top-k K --top-p P`` reproduces ``model.generate(..., seed=S, temperature=T, top_k=K,
top_p=P)`` token for token.
"""

from __future__ import annotations

import sys

import torch

from olmo_hybrid.cli import ArgumentParser
from olmo_hybrid.distributed import resolve_device
from olmo_hybrid.errors import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str]) -> int:
    from olmo_hybrid.checkpoint import load_model_and_tokenizer
    from olmo_hybrid.model.engine import Engine
    from olmo_hybrid.model.sampling import SamplingParams
    from olmo_hybrid.serve.detokenize import TextStream

    p = ArgumentParser(prog="olmo-hybrid generate", description=__doc__)
    p.add_argument("checkpoint", help="HF-format checkpoint directory or training run directory")
    p.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user's message)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens generated at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1.0 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same tokens")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user turn of the checkpoint's chat "
                                                       "template (ours if it has none) and stop at the turn's end")
    p.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer (dolma2, file or dir)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    args = p.parse_args(argv)
    # Every argument is checked before the model is loaded.
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    device = resolve_device(args.device, setting="--device")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tok = load_model_and_tokenizer(args.checkpoint, device=device, dtype=dtype, tokenizer=args.tokenizer)
    if args.chat:
        from olmo_hybrid.data.chat import END_OF_TURN, ChatTemplate

        ids, args.stop = ChatTemplate(tok).prompt_ids(args.prompt), args.stop + [END_OF_TURN]
    else:
        ids = tok.encode(args.prompt)
    if not ids:
        raise UsageError(f"--prompt {args.prompt!r} encodes to zero tokens")
    if len(ids) + args.max_new_tokens > model.config.max_seq_len:
        raise UsageError(f"--prompt is {len(ids)} tokens and --max-new-tokens {args.max_new_tokens}: together more "
                         f"than the model's window of {model.config.max_seq_len} tokens (max_seq_len)")
    engine = Engine(model, max_batch=1, max_context=len(ids) + args.max_new_tokens, tokenizer=tok,
                    cuda_graphs=device.type == "cuda")
    stream = TextStream(tok, holdback=max((len(s) for s in args.stop), default=1) - 1)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def on_token(request_id: int, token: int) -> None:
        write(stream.release())  # a new token means the previous ones did not end the request
        if token not in engine.eos_token_ids:  # an end-of-text token ends the request and is not printed
            stream.push(token)

    write(args.prompt + ("\n" if args.chat else ""))
    engine.submit(ids, args.max_new_tokens, sampling, stop=args.stop, on_token=on_token)
    (out,) = list(engine.run_until_done())
    write(stream.finish(out.text) + "\n")  # the held-back tail, cut before a stop string
    return 0
