"""``olmo-hybrid serve CHECKPOINT``: an OpenAI-compatible HTTP server (completions, chat, streaming, metrics).

Listens on 127.0.0.1 by default: pass ``--host 0.0.0.0`` to accept other machines (there is no authentication).
Needs the ``serve`` extra (starlette, uvicorn, prometheus_client, jinja2). See docs/serving.md.
"""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path

import torch

from olmo_hybrid.cli import ArgumentParser
from olmo_hybrid.cli.generate import DTYPES
from olmo_hybrid.distributed import resolve_device
from olmo_hybrid.errors import UsageError


def _positive(flag: str, value, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if value is None or value < 1:
        raise UsageError(f"{flag} must be >= 1, got {value}")
    return value


def check_listen_address(host: str, port: int) -> None:
    """Fail before the model loads when the server could not listen: a host that does not resolve or is not this
    machine's, a port another process holds. (Another process may still take the port in between.)"""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host!r} does not resolve: {e.strerror}") from e
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            sock.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(f"--port {port}: another process is listening on {host}:{port}") from e
            if e.errno == errno.EADDRNOTAVAIL:
                raise UsageError(f"--host {host!r} is not an address of this machine") from e
            if e.errno == errno.EACCES:
                raise UsageError(f"--port {port}: not permitted to listen there (ports below 1024 need "
                                 "privileges)") from e
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="olmo-hybrid serve", description=__doc__)
    p.add_argument("checkpoint", help="HF-format checkpoint directory or training run directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 accepts other machines (no authentication)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 = any free port")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the directory name)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="cache slots = sequences decoded together (default: as many as fit on CUDA, 8 on the CPU)")
    p.add_argument("--max-context", type=int, default=None, help="tokens per slot (default: the model's max_seq_len)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before answering 429")
    p.add_argument("--prefix-cache-gib", type=float, default=None,
                   help="memory for prefix state snapshots, 0 = off (default: 4 on CUDA, 0.25 on the CPU)")
    p.add_argument("--prefix-block", type=int, default=256, help="tokens per prefix-cache block")
    p.add_argument("--prefill-chunk", type=int, default=4096, help="prompt tokens per forward call")
    p.add_argument("--prefill-budget", type=int, default=None,
                   help="prompt tokens prefilled per engine step (default: all waiting prompts that have a slot)")
    p.add_argument("--memory-fraction", type=float, default=0.9,
                   help="fraction of free device memory used when sizing --max-batch automatically")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the decode step eagerly")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (fuses its elementwise kernels; compiles before serving)")
    p.add_argument("--chat-template", default=None, help="jinja file overriding the checkpoint's chat template")
    p.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer (dolma2, file or dir)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may finish after Ctrl-C/SIGTERM before they are aborted")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = p.parse_args(argv)
    for flag in ("max_batch", "max_context", "prefill_budget"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    _positive("--prefix-block", args.prefix_block, allow_none=False)
    _positive("--prefill-chunk", args.prefill_chunk, allow_none=False)
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.prefix_cache_gib is not None and args.prefix_cache_gib < 0:
        raise UsageError(f"--prefix-cache-gib must be >= 0, got {args.prefix_cache_gib}")
    if not 0 <= args.shutdown_timeout < float("inf"):
        raise UsageError(f"--shutdown-timeout must be a number of seconds >= 0, got {args.shutdown_timeout}")
    if not 0 < args.memory_fraction <= 1:
        raise UsageError(f"--memory-fraction must be in (0, 1], got {args.memory_fraction}")
    check_listen_address(args.host, args.port)
    template = None
    if args.chat_template is not None:
        try:
            template = Path(args.chat_template).read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--chat-template {args.chat_template}: {e.strerror or e}") from e
    try:
        from olmo_hybrid.serve.runner import run
        from olmo_hybrid.serve.server import ServeSettings, build_app, describe
    except ImportError as e:
        raise ImportError(f"olmo-hybrid serve needs the serve extra (pip install 'olmo-hybrid[serve]'): {e}") from e
    from olmo_hybrid.checkpoint import load_model_and_tokenizer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device, setting="--device")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tok = load_model_and_tokenizer(args.checkpoint, device=device, dtype=dtype, tokenizer=args.tokenizer)
    settings = ServeSettings(
        name=args.served_model_name or Path(args.checkpoint).resolve().name, max_batch=args.max_batch,
        max_context=args.max_context, max_queue=args.max_queue,
        prefix_cache_bytes=None if args.prefix_cache_gib is None else int(args.prefix_cache_gib * 2**30),
        prefix_block=args.prefix_block, prefill_chunk=args.prefill_chunk, prefill_budget=args.prefill_budget,
        cuda_graphs=not args.no_cuda_graphs, compile_decode=args.compile, memory_fraction=args.memory_fraction,
        shutdown_timeout=args.shutdown_timeout, chat_template=template)
    app = build_app(model, tok, settings, checkpoint_dir=args.checkpoint)
    print(f"olmo-hybrid serve: '{settings.name}' on http://{args.host}:{args.port} ({describe(app)})", flush=True)
    run(app, args.host, args.port, args.shutdown_timeout, args.log_level)
    return 0
