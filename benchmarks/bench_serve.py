"""Load test of ``olmo-hybrid serve``: many concurrent openai-client streams against the server on 127.0.0.1.

    python benchmarks/bench_serve.py                        # one GPU: the 1.5B shape, hybrid / no cache / twin
    python benchmarks/bench_serve.py --preset 7b            # the released 7B's shape: 8k in, 1k out, 32 concurrent
    python benchmarks/bench_serve.py --tiny                 # tiny shapes on the CPU: checks that everything runs

Each system is served by a child process (``--serve-child``; random weights in bf16 on the GPU, fp32 on the CPU)
that the parent starts, waits for (``/health``), loads with the workloads, scrapes (``/metrics``) and stops with
SIGTERM. Systems: ``hybrid`` (GGGA, prefix cache on), ``hybrid-nocache`` (the same, prefix cache off), ``attn`` (the
all-attention twin: same width, depth, heads and MLP; prefix cache on).

Workloads (prompts are token ids, so lengths are exact; every request generates exactly ``--new`` tokens,
``ignore_eos``): ``shared`` a ``--prompt``-token system prompt shared by all requests plus a 64-token question of
its own (the prefix cache's case); ``random`` independent random prompts of ``--prompt`` tokens. Each workload
sends ``--requests`` requests with at most ``--concurrency`` in flight, and stops sending at ``--time-cap``
seconds (the whole run is bounded by that cap per workload plus start-up).

Reported per system and workload: requests/s, output tokens/s, time to first token (TTFT) and time per output
token after the first (TPOT, per request) and inter-chunk latency (ITL) at p50/p90/p99, the server's peak GPU
memory and prefix-cache hit rate (from /metrics). Results as a markdown table (``--out`` appends it to a file).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time

import torch

# The 1.5B OLMo-Hybrid shape of benchmarks/bench_generate.py and the released 7B (ModelConfig defaults).
SHAPES = {
    "1.5b": dict(vocab_size=100352, d_model=2048, n_layers=16, n_heads=16, gdn_heads=16, gdn_head_k=96,
                 gdn_head_v=192, mlp_hidden=8192, rope_theta=500_000.0, layer_pattern="GGGA", max_seq_len=65536),
    "7b": {},
    "tiny": dict(vocab_size=512, d_model=64, n_layers=4, n_heads=4, gdn_heads=4, gdn_head_k=12, gdn_head_v=24,
                 mlp_hidden=128, rope_theta=10_000.0, layer_pattern="GGGA", max_seq_len=4096),
}
QUESTION = 64


# -- the server child -----------------------------------------------------------------------------------
def random_model(shape: str, system: str, device: torch.device, dtype: torch.dtype):
    """Random weights, initialised on ``device`` (a 7B init on the CPU would take minutes)."""
    from olmo_hybrid.config import ModelConfig
    from olmo_hybrid.model import HybridLM
    from olmo_hybrid.model.layers import GatedRMSNorm, RMSNorm

    cfg = ModelConfig(**SHAPES[shape])
    if system == "attn":
        cfg = dataclasses.replace(cfg, layer_pattern="A")
    torch.manual_seed(0)
    with torch.device(device):
        model = HybridLM(cfg, init=False).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, cfg.init_std) if p.dim() >= 2 else p.zero_()
        for m in model.modules():
            if isinstance(m, (RMSNorm, GatedRMSNorm)):
                m.weight.fill_(1.0)
            elif hasattr(m, "reset_gate_parameters"):
                m.reset_gate_parameters()
    return model.eval()


def serve_child(args) -> None:
    from olmo_hybrid.data.tokenizer import load_tokenizer, train_bpe
    from olmo_hybrid.serve.runner import run
    from olmo_hybrid.serve.server import ServeSettings, build_app, describe

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(args.preset, args.system, device, dtype)
    tok = train_bpe(["a b c"], vocab_size=300) if args.preset == "tiny" else load_tokenizer("dolma2")
    settings = ServeSettings(name=args.system, max_batch=args.concurrency,
                             max_context=args.prompt + QUESTION + args.new, max_queue=4 * args.concurrency,
                             prefix_cache_bytes=0 if args.system == "hybrid-nocache" else None,
                             prefill_budget=args.prefill_budget, compile_decode=args.compile)
    app = build_app(model, tok, settings)
    print(f"child: {args.system} {describe(app)}", flush=True)
    run(app, "127.0.0.1", args.port, shutdown_timeout=5.0, log_level="warning")


# -- the load ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    ok: bool
    ttft: float | None = None  # None: the request's tokens had no visible text to time
    tpot: float | None = None
    gaps: list = dataclasses.field(default_factory=list)
    tokens: int = 0
    error: str = ""


async def one_request(client, model: str, prompt: list[int], new: int) -> Result:
    t0 = time.perf_counter()
    times = []
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=new, temperature=0.0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        tokens = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # a failed request is counted, not fatal to the run
        return Result(False, error=repr(e)[:200])
    if not tokens:
        return Result(False, error="no tokens generated")
    # Tokens whose text is empty (special tokens) count, but cannot be timed: no TTFT without text, no time per
    # token from fewer than two timed chunks.
    ttft = times[0] - t0 if times else None
    tpot = (times[-1] - times[0]) / (tokens - 1) if len(times) > 1 and tokens > 1 else None
    return Result(True, ttft, tpot, [b - a for a, b in zip(times, times[1:])], tokens)


async def run_workload(url: str, model: str, prompts: list[list[int]], new: int, concurrency: int,
                       time_cap: float) -> tuple[list[Result], float]:
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=time_cap + 60,
                                http_client=httpx.AsyncClient(trust_env=False, limits=httpx.Limits(
                                    max_connections=concurrency, max_keepalive_connections=concurrency)))
    sem = asyncio.Semaphore(concurrency)
    stop_at = time.monotonic() + time_cap

    async def guarded(prompt):
        async with sem:
            if time.monotonic() > stop_at:
                return None
            return await one_request(client, model, prompt, new)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(guarded(p) for p in prompts))
    wall = time.perf_counter() - t0
    await client.close()
    return [r for r in results if r is not None], wall


def workload_prompts(kind: str, args, vocab: int, rng: random.Random) -> list[list[int]]:
    low = 1000 if vocab > 10_000 else 0  # dolma2's special tokens lie above 100,000 and below 1,000: none drawn
    draw = lambda n: [rng.randrange(low, vocab - low) for _ in range(n)]  # noqa: E731
    if kind == "shared":
        system = draw(args.prompt)
        return [system + draw(QUESTION) for _ in range(args.requests)]
    return [draw(args.prompt + QUESTION) for _ in range(args.requests)]


def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))] * 1000  # noqa: E731
    return f"{pick(0.5):.0f} / {pick(0.9):.0f} / {pick(0.99):.0f}"


def scrape(url: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", trust_env=False, timeout=10).text.splitlines():
        if line.startswith("olmo_hybrid_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def start_child(args, system: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--serve-child", "--system", system, "--port", str(port), "--preset", args.preset,
           "--prompt", str(args.prompt), "--new", str(args.new), "--concurrency", str(args.concurrency)]
    if args.prefill_budget:
        cmd += ["--prefill-budget", str(args.prefill_budget)]
    if args.compile:
        cmd += ["--compile"]
    return subprocess.Popen(cmd, start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server child exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", trust_env=False, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server child was not healthy within {timeout} s")


def bench_system(args, system: str, vocab: int) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = start_child(args, system, port)
    rows = []
    try:
        wait_healthy(url, proc, args.start_timeout)
        for kind in args.workloads.split(","):
            rng = random.Random(1)
            warm = workload_prompts("random", argparse.Namespace(**{**vars(args), "requests": 2}), vocab, rng)
            asyncio.run(run_workload(url, system, warm, 4, 2, args.time_cap))  # warm-up: kernels, graphs, allocator
            prompts = workload_prompts(kind, args, vocab, random.Random(kind))
            before = scrape(url)
            results, wall = asyncio.run(run_workload(url, system, prompts, args.new, args.concurrency, args.time_cap))
            after = scrape(url)
            good = [r for r in results if r.ok]
            errors = sorted({r.error for r in results if not r.ok})
            tokens = sum(r.tokens for r in good)
            queried = after.get("olmo_hybrid_prefix_cache_queried_tokens_total", 0) - \
                before.get("olmo_hybrid_prefix_cache_queried_tokens_total", 0)
            hit = after.get("olmo_hybrid_prefix_cache_hit_tokens_total", 0) - \
                before.get("olmo_hybrid_prefix_cache_hit_tokens_total", 0)
            peak = after.get('olmo_hybrid_memory_bytes{kind="device_peak_allocated"}')
            row = (f"| {system} | {kind} | {len(good)}/{len(prompts)} | {len(good) / wall:.2f} | "
                   f"{tokens / wall:,.0f} | "
                   f"{percentiles([r.ttft for r in good if r.ttft is not None])} | "
                   f"{percentiles([r.tpot for r in good if r.tpot is not None])} | "
                   f"{percentiles([g for r in good for g in r.gaps])} | "
                   f"{'-' if peak is None else f'{peak / 2**30:.1f} GiB'} | "
                   f"{f'{hit / queried:.0%}' if queried else '-'} |")
            rows.append(row)
            print(row, flush=True)
            for e in errors[:3]:
                print(f"  error: {e}", flush=True)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(SHAPES), default=None, help="model shape (default: 1.5b, tiny with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and loads on the CPU")
    p.add_argument("--systems", default=None, help="comma-separated (default: hybrid,hybrid-nocache,attn; 7b: hybrid)")
    p.add_argument("--workloads", default=None, help="shared,random (default both; 7b: random)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (shared: the system prompt); default "
                   "4096, 8192 at 7b")
    p.add_argument("--new", type=int, default=None, help="new tokens per request (default 128, 1024 at 7b)")
    p.add_argument("--requests", type=int, default=None, help="requests per workload (default 128; 7b: 64)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--prefill-budget", type=int, default=None, help="the server's --prefill-budget")
    p.add_argument("--compile", action="store_true", help="the server's --compile (torch.compile the decode step)")
    p.add_argument("--time-cap", type=float, default=300.0, help="seconds per workload before sending stops")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--out", default=None, help="append the markdown report to this file")
    p.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--system", default="hybrid", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.preset = args.preset or ("tiny" if args.tiny else "1.5b")
    big = args.preset == "7b"
    tiny = args.preset == "tiny"
    args.prompt = args.prompt or (320 if tiny else 8192 if big else 4096)
    args.new = args.new or (8 if tiny else 1024 if big else 128)
    args.requests = args.requests or (16 if tiny else 64 if big else 128)
    if tiny and args.concurrency == 32:
        args.concurrency = 4
    if args.serve_child:
        serve_child(args)
        return 0
    systems = (args.systems or ("hybrid" if big else "hybrid,hybrid-nocache,attn")).split(",")
    args.workloads = args.workloads or ("random" if big else "shared,random")
    from olmo_hybrid.config import ModelConfig

    vocab = ModelConfig(**SHAPES[args.preset]).vocab_size if not tiny else 300
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    head = (f"\n### Serving load test, {args.preset} shape ({datetime.date.today()}, {gpu}, "
            f"torch {torch.__version__})\n\n"
            f"{args.requests} requests per workload, {args.concurrency} concurrent, prompt {args.prompt} tokens "
            f"(+{QUESTION}-token question), {args.new} new tokens each; latencies in ms as p50 / p90 / p99.\n\n"
            "| system | workload | ok | req/s | output tok/s | TTFT | TPOT | ITL | peak GPU mem | prefix hit |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(head, flush=True)
    rows = []
    for system in systems:
        rows += bench_system(args, system, vocab)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(head + "\n" + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
