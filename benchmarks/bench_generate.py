"""Generation speed and memory: our engine vs transformers, hybrid vs all-attention, in one process.

    python benchmarks/bench_generate.py                 # one GPU, the 1.5B OLMo-Hybrid shape (FULL_SHAPE)
    python benchmarks/bench_generate.py --tiny          # tiny shapes on CPU: checks that everything runs
    python benchmarks/bench_generate.py --cases b8 --check --out $OUT/generate.md

Systems: ``ours-hybrid`` (olmo_hybrid.serve.Engine on HybridLM, pattern GGGA), ``ours-attn`` (the same engine on
the all-attention twin: same width, depth, heads and MLP), ``hf-hybrid`` (transformers' OlmoHybridForCausalLM,
using fla when installed), ``hf-olmo3`` (transformers' Olmo3ForCausalLM with every layer full attention).
All use random weights and random prompts; greedy decoding for exactly ``new`` tokens.

Cases (``--cases``, comma-separated): ``b8`` batch 8 x 4096-token prompts + 128 new tokens (all four systems);
``32k-b1`` and ``32k-b16`` 32768-token prompts (ours; ``--hf-long`` adds transformers); ``64k-fit`` the largest
batch whose cache fits in free GPU memory at 64k context, from the memory accounting, then confirmed by running
it (``--no-fit-run`` to skip). ``--check`` first compares the engine's greedy tokens with the model's full
forward (teacher-forced; 8 prompts x 32 new tokens at the b8 prompt length), listing any disagreement with
its logit gap: tiny gaps are bf16 near-ties between the flat logits of random weights, large ones are bugs.

Columns: prefill s (all prompts, wall clock), decode tok/s (new tokens after the first, per second of decode),
new tok/s (all new tokens / total time, prefill included), extra peak memory over the weights, and that
peak divided by the batch beside the per-sequence cache bytes the config computes (``olmo-hybrid info``).
Decode bandwidth: step ms (batch / decode tok/s), the fewest bytes a step must move (every weight but the
embedding table once, each row's KV cache at the mean decode context once, GDN states read and written once),
and those bytes over the step time as TB/s (an H100 copies ~3.0 TB/s device to device).

``--kernel-bench`` first times the decode attention alone at 32k keys (our split-KV kernel in a few
configurations, SDPA flash over exactly the keys needed, SDPA with a per-row mask as the engine would
otherwise use); ``--profile`` prints, after each run of our engine, where the time of pure decode steps goes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import platform
import time
import traceback

import torch

from olmo_hybrid import ops
from olmo_hybrid.config import ModelConfig
from olmo_hybrid.model import HybridLM
from olmo_hybrid.model.cache import cache_bytes_per_sequence
from olmo_hybrid.model.memory import format_bytes, workspace_bytes
from olmo_hybrid.serve import Engine, max_sequences
from olmo_hybrid.serve.verify import greedy_disagreements, teacher_forced_logits

# A 1.5B OLMo-Hybrid shape (docs/benchmarks.md, "Generation"); MLP as the OLMo 3 ladder at this width (SwiGLU
# multiplier 1.5).
FULL_SHAPE = dict(vocab_size=100352, d_model=2048, n_layers=16, n_heads=16, gdn_heads=16, gdn_head_k=96,
                  gdn_head_v=192, mlp_hidden=8192, rope_theta=500_000.0, layer_pattern="GGGA",
                  max_seq_len=65536 + 512)
TINY_SHAPE = dict(vocab_size=512, d_model=64, n_layers=4, n_heads=4, gdn_heads=4, gdn_head_k=12, gdn_head_v=24,
                  mlp_hidden=128, rope_theta=10_000.0, layer_pattern="GGGA", max_seq_len=4096)


@dataclasses.dataclass
class Case:
    name: str
    batch: int  # 0: find the largest batch that fits
    prompt: int
    new: int
    systems: tuple[str, ...]


def cases(tiny: bool, hf_long: bool) -> dict[str, Case]:
    s = (lambda full, small: small) if tiny else (lambda full, small: full)
    all4 = ("ours-hybrid", "ours-attn", "hf-olmo3", "hf-hybrid")  # fla's first-call autotuning last
    long = all4 if hf_long else ("ours-hybrid", "ours-attn")
    return {
        "b8": Case("b8", s(8, 2), s(4096, 64), s(128, 8), all4),
        "32k-b1": Case("32k-b1", 1, s(32768, 256), s(128, 8), long),
        "32k-b16": Case("32k-b16", s(16, 4), s(32768, 256), s(128, 8), long),
        "64k-fit": Case("64k-fit", 0, s(65536, 512), s(2, 2), ("ours-hybrid", "ours-attn")),
    }


# -- devices, memory ------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


# -- models ---------------------------------------------------------------------------------------------

def build(system: str, cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """A random-weight model for ``system`` on ``device`` in ``dtype``."""
    torch.manual_seed(0)
    if system.startswith("ours"):
        twin = cfg if system == "ours-hybrid" else dataclasses.replace(cfg, layer_pattern="A")
        with torch.device(device):
            return HybridLM(twin).to(dtype).eval()
    import transformers

    from olmo_hybrid.model.hf_io import config_to_hf

    hf = config_to_hf(cfg, dtype)
    if system == "hf-hybrid":
        try:  # transformers 5.23 reads RoPE per layer type here as NoPE; older ones may need it (as Olmo3 below)
            config = transformers.OlmoHybridConfig(**hf)
        except (AttributeError, TypeError, ValueError):
            config = transformers.OlmoHybridConfig(**{**hf, "rope_parameters": {"full_attention": hf["rope_parameters"]}})
        cls = transformers.OlmoHybridForCausalLM
    else:
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
        common = dict({k: hf[k] for k in keys}, layer_types=["full_attention"] * cfg.n_layers)
        try:  # RoPE per layer type (transformers 5.17 reads Olmo3's rope_parameters only this way)
            config = transformers.Olmo3Config(**common, rope_parameters={"full_attention": hf["rope_parameters"]})
        except (AttributeError, TypeError, ValueError):
            config = transformers.Olmo3Config(**common, rope_parameters=hf["rope_parameters"])
        cls = transformers.Olmo3ForCausalLM
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(config).eval()
    finally:
        torch.set_default_dtype(default)


def random_prompts(batch: int, length: int, vocab: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


# -- runs -----------------------------------------------------------------------------------------------

def run_ours(model, prompts: torch.Tensor, new: int, dtype, cuda_graphs: bool, prefill_chunk: int,
             compile_decode: str | None = None) -> dict:
    device = prompts.device
    b, p = prompts.shape
    engine = Engine(model, max_batch=b, max_context=p + new, device=device, dtype=dtype,
                    prefill_chunk=prefill_chunk, cuda_graphs=cuda_graphs, compile_decode=compile_decode)
    # Warm-up: lazy init and kernel compilation, including a prefill chunk that continues from a cached state
    # (the kernels specialise on it), so the timed prefill compiles nothing.
    warm = prompts[0, :min(p, prefill_chunk + 16)]
    engine.generate([warm] + [prompts[0, :16]] * (b - 1), max_new_tokens=4)
    engine.stats = type(engine.stats)()
    sync(device)
    t0 = time.perf_counter()
    outs = engine.generate(list(prompts), max_new_tokens=new, ignore_eos=True)
    sync(device)
    total = time.perf_counter() - t0
    assert all(len(o.token_ids) == new for o in outs)
    st = engine.stats
    return {"prefill_s": st.prefill_seconds, "decode_tok_s": st.decode_tokens / max(st.decode_seconds, 1e-9),
            "new_tok_s": b * new / total, "total_s": total, "engine": engine}


def profile_engine(engine: Engine, prompts: torch.Tensor, label: str, new: int, steps: int = 8) -> None:
    """Print where the time of up to ``steps`` pure decode steps goes (torch profiler, top ops), after a prefill
    (requests of ``new`` tokens, as the measured run)."""
    from torch.profiler import ProfilerActivity, profile

    steps = min(steps, new - 2)
    for p in prompts:
        engine.submit(p, new, ignore_eos=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if prompts.device.type == "cuda" else [])
    key = "self_cuda_time_total" if prompts.device.type == "cuda" else "self_cpu_time_total"
    with profile(activities=activities) as prof:
        engine.step()  # prefills every prompt (no prefill budget) and decodes once
        sync(prompts.device)
    print(f"\nprofile of {label}: prefill of {len(prompts)} x {prompts.shape[1]} tokens, by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=20), flush=True)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync(prompts.device)
    list(engine.run_until_done())
    print(f"\nprofile of {label}: {steps} decode steps at batch {len(prompts)}, by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=25), flush=True)


def decode_step_bytes(model, cfg: ModelConfig, batch: int, context: int, item: int) -> int:
    """The fewest bytes one decode step moves: weights except the embedding table (a step reads ``batch`` of
    its rows), each row's KV cache at ``context`` tokens, GDN state read and written, conv state."""
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) * item
    cache = cache_bytes_per_sequence(cfg, context, item)
    return weights + batch * (cache["kv_cache"] + 2 * cache["gdn_state"] + 2 * cache["conv_state"])


def kernel_bench(device: torch.device, dtype: torch.dtype, length: int = 32768, heads: int = 16, dim: int = 128):
    """Decode attention alone, one query per row over ``length`` keys: our kernel vs SDPA (flash / masked)."""
    import torch.nn.functional as F
    from triton.testing import do_bench

    from olmo_hybrid.ops import decode_attention
    from olmo_hybrid.ops.decode_attention.kernel import decode_attention_triton

    print(f"\ndecode attention alone: {heads} heads x {dim}, {length} keys per row, {dtype}", flush=True)
    for batch in (1, 16):
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(batch, heads, 1, dim, device=device, dtype=dtype, generator=gen)
        k, v = (torch.randn(batch, heads, length + 128, dim, device=device, dtype=dtype, generator=gen)
                for _ in range(2))
        lengths = torch.full((batch,), length, device=device)
        ref = F.scaled_dot_product_attention(q, k[:, :, :length], v[:, :, :length])
        moved = 2 * batch * heads * length * dim * k.element_size()
        mask = (torch.arange(length + 128, device=device) < length)[None, None, None, :].expand(batch, 1, 1, -1)
        runs = {"sdpa flash (exact keys, no mask)": lambda: F.scaled_dot_product_attention(
                    q, k[:, :, :length], v[:, :, :length]),
                "sdpa with key mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)}
        runs["ours, defaults"] = lambda: decode_attention(q, k, v, lengths)
        for block_n, warps, per_sm in ((64, 4, 4), (128, 4, 4), (64, 4, 8), (128, 4, 8), (128, 8, 4), (256, 8, 4)):
            runs[f"ours block_n={block_n} warps={warps} programs/SM={per_sm}"] = (
                lambda b=block_n, w=warps, n=per_sm: decode_attention_triton(
                    q, k, v, lengths, dim ** -0.5, block_n=b, num_warps=w, programs_per_sm=n))
        for name, fn in runs.items():
            err = float((fn().float() - ref.float()).norm() / ref.float().norm())
            us = do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3
            print(f"  batch {batch:2d}  {name:40s} {us:8.1f} us  {moved / us / 1e6:5.2f} TB/s  rel err {err:.1e}",
                  flush=True)
        runs.clear()  # the closures hold this batch's tensors
        free_memory(device)


@torch.no_grad()
def run_hf(model, prompts: torch.Tensor, new: int) -> dict:
    device = prompts.device
    b, p = prompts.shape
    mask = torch.ones_like(prompts)
    kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    model.generate(prompts[:, :16], attention_mask=mask[:, :16], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
    sync(device)
    t0 = time.perf_counter()
    model(prompts, attention_mask=mask, use_cache=True, logits_to_keep=1)
    sync(device)
    prefill = time.perf_counter() - t0
    free_memory(device)
    t0 = time.perf_counter()
    out = model.generate(prompts, attention_mask=mask, **kw)
    sync(device)
    total = time.perf_counter() - t0
    assert out.shape[1] == p + new
    return {"prefill_s": prefill, "decode_tok_s": b * (new - 1) / max(total - prefill, 1e-9),
            "new_tok_s": b * new / total, "total_s": total}


def measure(system: str, cfg: ModelConfig, case: Case, batch: int, device, dtype, args) -> dict:
    model = build(system, cfg, device, dtype)
    free_memory(device)
    base = allocated(device)
    reset_peak(device)
    prompts = random_prompts(batch, case.prompt, cfg.vocab_size, device)
    if system.startswith("ours"):
        graphs = args.cuda_graphs and case.batch > 0  # the fit run decodes 2 tokens: capture is not worth it
        row = run_ours(model, prompts, case.new, dtype, graphs, args.prefill_chunk,
                       "inductor" if args.compile_decode else None)
        engine = row.pop("engine")
        if args.profile:
            profile_engine(engine, prompts, f"{case.name} {system}", case.new)
        del engine
    else:
        row = run_hf(model, prompts, case.new)
    top = peak(device)
    twin = cfg if system.endswith("hybrid") else dataclasses.replace(cfg, layer_pattern="A")
    item = torch.empty((), dtype=dtype).element_size()
    row["computed_per_seq"] = cache_bytes_per_sequence(twin, case.prompt + case.new, item)["total"]
    row["step_s"] = batch / row["decode_tok_s"]
    row["step_bytes"] = decode_step_bytes(model, twin, batch, case.prompt + case.new // 2, item)
    row["extra_peak"] = None if top is None else top - base
    row.update(system=system, case=case.name, batch=batch, prompt=case.prompt, new=case.new)
    del model, prompts
    free_memory(device)
    return row


def largest_fitting_batch(system: str, cfg: ModelConfig, case: Case, device, dtype, args) -> int:
    """From the accounting: free memory after the weights, minus workspace, over the bytes per sequence."""
    twin = cfg if system.endswith("hybrid") else dataclasses.replace(cfg, layer_pattern="A")
    context = case.prompt + case.new
    if device.type == "cuda":
        loaded = [build(system, cfg, device, dtype)]  # free memory is measured with the weights in place
        free_memory(device)
        budget = torch.cuda.mem_get_info(device)[0]
        loaded.clear()
        free_memory(device)
    else:
        budget = args.cpu_budget_mib * 2**20
    batch = 1
    for _ in range(3):  # the decode workspace grows with the batch: iterate to a fixed point
        work = workspace_bytes(twin, args.prefill_chunk, batch, dtype)
        batch = max_sequences(twin, context, max(0, budget - work) * 95 // 100, dtype)
    return batch


def check_greedy(cfg: ModelConfig, device, dtype, prompt_len: int, args) -> str:
    """Engine greedy tokens vs the model's full forward (teacher-forced), 8 prompts x 32 new tokens."""
    model = build("ours-hybrid", cfg, device, dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(args.head_scale)
    new = 32 if not args.tiny else 8
    prompts = random_prompts(8, prompt_len, cfg.vocab_size, device, seed=1)
    engine = Engine(model, max_batch=8, max_context=prompt_len + new, prefill_chunk=args.prefill_chunk,
                    cuda_graphs=args.cuda_graphs)
    outs = engine.generate(list(prompts), new, ignore_eos=True)
    del engine  # its cache and CUDA graphs
    free_memory(device)
    found = [(i, d) for i, out in enumerate(outs) for d in greedy_disagreements(model, prompts[i], out.token_ids)]
    what = f"8 prompts x {new} new tokens, prompt {prompt_len}, LM head x{args.head_scale}"
    summary = f"greedy check: {len(found)} of {8 * new} tokens differ from the full forward's argmax ({what})"
    if dtype != torch.float32:
        # The noise floor of the dtype: the same weights computed in fp32 decide every position; the engine
        # should disagree with them no more often than the model's own full forward in this dtype does.
        model32 = copy.deepcopy(model).float()
        vs32 = [0, 0]
        for prompt, out in zip(prompts, outs):
            truth = teacher_forced_logits(model32, prompt, out.token_ids).argmax(-1)
            low = teacher_forced_logits(model, prompt, out.token_ids).argmax(-1)
            vs32[0] += int((torch.tensor(out.token_ids, device=device) != truth).sum())
            vs32[1] += int((low != truth).sum())
        summary += (f"; against the same weights in fp32 (teacher-forced on the engine's tokens): engine "
                    f"{vs32[0]}, the {str(dtype).removeprefix('torch.')} full forward {vs32[1]} of {8 * new} differ")
        del model32
    del model
    free_memory(device)
    lines = [f"  prompt {i} token {d.index}: engine {d.token}, full forward {d.argmax}, logit gap {d.gap:.3g} "
             f"(logit std {d.spread:.3g})" for i, d in found]
    return "\n".join([summary + (":" if lines else "")] + lines)


# -- report ---------------------------------------------------------------------------------------------

def versions() -> str:
    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    for name in ("transformers", "fla", "triton"):
        try:
            mod = __import__(name)
            parts.append(f"{name} {getattr(mod, '__version__', '?')}")
        except ImportError:
            parts.append(f"{name} not installed")
    parts.append(f"GDN backends {ops.available_backends('gated_delta_rule')}")
    return ", ".join(parts)


def table(rows: list[dict]) -> str:
    head = ("| case | system | batch | prompt | new | prefill s | decode tok/s | new tok/s | step ms | GB / step | "
            "TB/s | extra peak | peak / seq | computed / seq |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['system']} | {r['batch']} | {r['prompt']} | {r['new']} | "
                         f"{r['error']} ||||||||| ")
            continue
        extra = r["extra_peak"]
        lines.append(
            f"| {r['case']} | {r['system']} | {r['batch']} | {r['prompt']} | {r['new']} | {r['prefill_s']:.3f} | "
            f"{r['decode_tok_s']:,.1f} | {r['new_tok_s']:,.1f} | {r['step_s'] * 1e3:.3f} | "
            f"{r['step_bytes'] / 1e9:.3f} | {r['step_bytes'] / r['step_s'] / 1e12:.2f} | "
            f"{format_bytes(extra) if extra is not None else '-'} | "
            f"{format_bytes(extra / r['batch']) if extra is not None else '-'} | "
            f"{format_bytes(r['computed_per_seq'])} |")
    return "\n".join(lines)


def marginal_memory(rows: list[dict]) -> list[str]:
    """Peak memory per additional sequence, from two runs of one system at the same lengths and different batch
    sizes: the fixed workspace (one prefill chunk's activations) cancels out."""
    out = []
    done = [r for r in rows if r.get("extra_peak") is not None]
    for a in done:
        for b in done:
            if (a["system"], a["prompt"], a["new"]) == (b["system"], b["prompt"], b["new"]) and a["batch"] < b["batch"]:
                per = (b["extra_peak"] - a["extra_peak"]) / (b["batch"] - a["batch"])
                out.append(f"{a['system']}: peak memory per added sequence ({a['case']} -> {b['case']}) "
                           f"{format_bytes(per)}, computed {format_bytes(a['computed_per_seq'])} "
                           f"({per / a['computed_per_seq'] - 1:+.1%})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU by default)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--cases", default="b8,32k-b1,32k-b16,64k-fit")
    p.add_argument("--systems", default=None, help="comma-separated subset of systems (default: each case's own)")
    p.add_argument("--hf-long", action="store_true", help="also run transformers at 32k")
    p.add_argument("--no-fit-run", action="store_true", help="64k-fit: report the accounting only")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-decode", action="store_true", help="our engine: torch.compile the decode step")
    p.add_argument("--prefill-chunk", type=int, default=None, help="default: 4096 (128 with --tiny)")
    p.add_argument("--check", action="store_true", help="first compare greedy tokens with full forwards")
    p.add_argument("--profile", action="store_true", help="after each run of our engine, print a decode profile")
    p.add_argument("--kernel-bench", action="store_true", help="first time decode attention alone (CUDA)")
    p.add_argument("--head-scale", type=float, default=1.0, help="--check: multiply the LM head by this")
    p.add_argument("--cpu-budget-mib", type=int, default=8, help="64k-fit on CPU: the memory budget")
    p.add_argument("--out", default=None, help="append the markdown report to this file")
    args = p.parse_args(argv)

    args.prefill_chunk = args.prefill_chunk or (128 if args.tiny else 4096)
    if args.tiny:
        torch.set_num_threads(1)  # tiny matmuls only lose to thread synchronisation
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cfg = ModelConfig(**(TINY_SHAPE if args.tiny else FULL_SHAPE))
    all_cases = cases(args.tiny, args.hf_long)
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in all_cases]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {', '.join(all_cases)}")
    only = set(args.systems.split(",")) if args.systems else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    header = [f"## Generation benchmark ({'tiny' if args.tiny else '1.5B OLMo-Hybrid shape'})", "",
              f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
              f"- device: {device} ({name}), dtype {str(dtype).removeprefix('torch.')}, "
              f"CUDA graphs {'on' if args.cuda_graphs and device.type == 'cuda' else 'off'}, "
              f"prefill chunk {args.prefill_chunk}",
              f"- versions: {versions()}",
              f"- model: d_model {cfg.d_model}, {cfg.n_layers} layers ({''.join(cfg.layer_types)}), "
              f"{cfg.n_heads} heads, GDN K={cfg.gdn_head_k} V={cfg.gdn_head_v}, MLP {cfg.mlp_hidden}, "
              f"vocab {cfg.vocab_size}; random weights, greedy", ""]
    print("\n".join(header), flush=True)
    notes = []
    if args.kernel_bench and device.type == "cuda":
        kernel_bench(device, dtype)
    if args.check:
        notes.append(check_greedy(cfg, device, dtype, all_cases["b8"].prompt, args))
        print(notes[-1], flush=True)
    rows = []
    for case in (all_cases[c] for c in chosen):
        for system in case.systems:
            if only and system not in only:
                continue
            batch = case.batch
            if batch == 0:
                batch = largest_fitting_batch(system, cfg, case, device, dtype, args)
                notes.append(f"{case.name}: accounting says {batch} sequences of {case.prompt + case.new} tokens "
                             f"fit for {system}")
                print(notes[-1], flush=True)
                if args.no_fit_run or batch == 0:
                    continue
            print(f"running {case.name} {system} batch {batch} ...", flush=True)
            try:
                rows.append(measure(system, cfg, case, batch, device, dtype, args))
            except Exception as e:  # one system's failure (OOM, a missing library) must not end the run
                traceback.print_exc()
                rows.append(dict(case=case.name, system=system, batch=batch, prompt=case.prompt, new=case.new,
                                 error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
                free_memory(device)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    notes += marginal_memory(rows)
    report = "\n".join(header + [table(rows), ""] + [f"- {n}" for n in notes]) + "\n"
    print("\n" + report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
