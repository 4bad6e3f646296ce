"""Where the bf16 noise in the GDN gate-parameter gradients (dt_bias, A_log) comes from (CPU).

    TRITON_INTERPRET=1 python benchmarks/gdn_dg_noise_cpu.py                          # ~1.5 minutes on 2 cores
    TRITON_INTERPRET=1 python benchmarks/gdn_dg_noise_cpu.py --model-triton-seeds 1 2  # + ~75 s per seed

dt_bias and A_log see sum_t dg_t (weighted) over every token of a head, a sum that cancels: on the model's own
inputs |sum_t dg_t| is 2-20% of |dg| sqrt(T). So both parts look at that sum, not at dg's relative L2 error.

Part 1, the op on its own: the inputs and output gradient of each GDN layer of the small GGGA model of
``param_grad_noise_cpu.py`` (bf16 autocast, torch backend; batch row 0) and of model-like random inputs. For the
same bf16 inputs it compares dg of the torch reference (fp32 math), of our Triton kernels (interpreted: tf32
operands rounded to nearest, as ``dot_precision`` emulates) and of our kernels with tf32 operands *truncated*
(what an NVIDIA tensor core reads: the top 10 mantissa bits; Triton does not round them first) against float64:
dg's relative L2 error, and the error of the per-head sum over tokens in units of |dg| sqrt(T), signed so that
negative means "towards zero" (a bias shows up as a mean far from zero with most heads negative).

Part 2, the model: relative L2 error of each layer's dt_bias gradient under bf16 autocast against the fp32
gradient, over several model seeds, with the torch reference run as ``param_grad_noise_cpu.py`` runs it (inside
autocast: its matmuls in bf16), outside autocast (fp32 math on the bf16 inputs, as our kernels do) and in float64
on the same inputs. ``--model-triton-seeds`` adds our kernels (slow in the interpreter).
"""

from __future__ import annotations

import os

# A CPU script: Triton's interpreter runs the kernels, and must be chosen before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import copy
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from olmo_hybrid import ops
from olmo_hybrid.config import ModelConfig
from olmo_hybrid.model import HybridLM
from olmo_hybrid.ops.gated_delta_rule import chunk_common

CFG = ModelConfig(vocab_size=512, d_model=128, n_layers=4, layer_pattern="GGGA", n_heads=4, gdn_heads=4,
                  gdn_head_k=32, gdn_head_v=64, mlp_hidden=256, max_seq_len=256, rope_theta=1e4)
GDR = ops.gated_delta_rule


@triton.jit
def _truncate_tf32(x):
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    return (bits & 0xFFFFE000).to(tl.float32, bitcast=True)


def round_interpreter_bf16_casts() -> None:
    """Make the interpreter's float32 -> bfloat16 casts round to nearest even, as the GPU's do (Triton 3.6's
    interpreter truncates them: our kernels' bf16 outputs o, dq, dk, dv then shrink by ~3e-3 on average)."""
    from triton.runtime import interpreter

    truncating = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            return torch.from_numpy(data.astype("float32")).bfloat16().view(torch.int16).numpy().view("uint16")
        return truncating(data, src, dst, rounding_mode)

    interpreter._convert_float = convert


def model_and_tokens(seed: int):
    torch.manual_seed(seed)
    return HybridLM(CFG), torch.randint(0, CFG.vocab_size, (4, 256))


def loss(model, tokens, bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(tokens)
    return F.cross_entropy(logits.float().view(-1, CFG.vocab_size), tokens.roll(-1, 1).view(-1))


def captured_op_inputs(seed: int) -> list[dict]:
    """q, k, v, g, beta and dO of every GDN layer (batch row 0) in one bf16-autocast step of the torch backend."""
    model, tokens = model_and_tokens(seed)
    caps = []

    def recording(q, k, v, g, beta, **kw):
        o, s = GDR(q, k, v, g, beta, **kw)
        rec = {n: x.detach()[:1] for n, x in zip(("q", "k", "v", "g", "beta"), (q, k, v, g, beta))}
        o.register_hook(lambda grad: rec.__setitem__("do", grad.detach()[:1]))
        caps.append(rec)
        return o, s

    ops.gated_delta_rule = recording
    try:
        with ops.use_backend("torch"):
            loss(model, tokens, bf16=True).backward()
    finally:
        ops.gated_delta_rule = GDR
    return caps


def random_op_inputs(seed: int, T=256, H=4, K=32, V=64) -> dict:
    """Model-like inputs: bf16 q, k, v, dO; g = -A softplus(x + dt_bias) with the model's A and dt ranges."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    A = torch.empty(H).uniform_(1, 16, generator=gen)
    dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(0.1), generator=gen))
    return dict(q=r(1, T, H, K).bfloat16(), k=r(1, T, H, K).bfloat16(), v=r(1, T, H, V).bfloat16(),
                g=-A * F.softplus(r(1, T, H) + torch.log(torch.expm1(dt))), beta=2 * torch.sigmoid(r(1, T, H)),
                do=r(1, T, H, V).bfloat16())


def op_dg(inp: dict, backend: str, dtype=None, truncate_tf32: bool = False) -> torch.Tensor:
    xs = [inp[n].to(dtype) if dtype else inp[n] for n in ("q", "k", "v", "g", "beta")]
    xs = [x.detach().requires_grad_() for x in xs]
    rounding = chunk_common.round_tf32
    if truncate_tf32:  # the interpreter looks the helper up when the kernel runs, so swapping it here suffices
        chunk_common.round_tf32 = _truncate_tf32
    try:
        o, _ = ops.gated_delta_rule(*xs, use_qk_l2norm_in_kernel=True, backend=backend)
        o.backward(inp["do"].to(o.dtype))
    finally:
        chunk_common.round_tf32 = rounding
    return xs[3].grad.double()


def part1(samples: dict[str, list[dict]]) -> None:
    print("Part 1: dg of the op on identical bf16 inputs, against float64")
    variants = {"torch reference (fp32 math)": dict(backend="torch"),
                "ours, tf32 rounded (interpreter)": dict(backend="triton"),
                "ours, tf32 truncated (GPU-like)": dict(backend="triton", truncate_tf32=True)}
    for name, inputs in samples.items():
        refs = [op_dg(inp, "torch", torch.float64) for inp in inputs]
        canc = torch.cat([r.sum(1).abs().flatten() / (r.norm(dim=1).flatten() * r.shape[1] ** 0.5) for r in refs])
        print(f"  {name}: {canc.numel()} head sums; |sum dg| / (|dg| sqrt T) median {canc.median():.3f}")
        for vname, kw in variants.items():
            rel, err, frac = [], [], []
            for inp, ref in zip(inputs, refs):
                dg = op_dg(inp, **kw)
                s, sr = dg.sum(1).flatten(), ref.sum(1).flatten()
                rel.append(float((dg - ref).norm() / ref.norm()))
                err.append((s - sr) * sr.sign() / (ref.norm(dim=1).flatten() * ref.shape[1] ** 0.5))
                frac.append((s - sr).abs() / sr.abs())
            e, f = torch.cat(err), torch.cat(frac)
            print(f"    {vname:34s} dg rel L2 {sum(rel) / len(rel):.1e} | sum error / (|dg| sqrt T): rms"
                  f" {e.pow(2).mean().sqrt():.1e} mean {e.mean():+.1e}, towards zero in {int((e < 0).sum())}/"
                  f"{e.numel()} | relative error of the sum: median {f.median():.1e} max {f.max():.1e}", flush=True)


def part2(seeds, triton_seeds) -> None:
    print("Part 2: relative L2 error of the dt_bias gradients (layers 0, 1, 2), bf16 autocast vs fp32")

    def outside_autocast(dtype):
        def op(q, k, v, g, beta, **kw):
            with torch.autocast("cpu", enabled=False):
                o, s = GDR(*(x.to(dtype) for x in (q, k, v, g, beta)), **kw)
            return o.to(q.dtype), s
        return op

    variants = {"torch reference in autocast": ("torch", None),
                "torch reference, fp32 (no autocast)": ("torch", outside_autocast(torch.float32)),
                "torch reference, float64": ("torch", outside_autocast(torch.float64)),
                "ours (Triton, interpreted)": ("triton", None)}
    for name, (backend, wrapper) in variants.items():
        rows, all_errs = [], []
        for seed in (triton_seeds if backend == "triton" else seeds):
            model, tokens = model_and_tokens(seed)
            truth = copy.deepcopy(model)
            with ops.use_backend("torch"):
                loss(truth, tokens, bf16=False).backward()
            ops.gated_delta_rule = wrapper or GDR
            try:
                with ops.use_backend(backend):
                    loss(model, tokens, bf16=True).backward()
            finally:
                ops.gated_delta_rule = GDR
            errs = [float((m.dt_bias.grad - t.dt_bias.grad).norm() / t.dt_bias.grad.norm())
                    for m, t in zip(model.modules(), truth.modules()) if hasattr(m, "dt_bias")]
            rows.append(f"seed {seed}: " + "/".join(f"{100 * x:.1f}" for x in errs))
            all_errs += errs
        if rows:
            print(f"  {name:36s} %  median {100 * torch.tensor(all_errs).median():.1f}  " + "  ".join(rows), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-seeds", type=int, nargs="*", default=list(range(8)))
    ap.add_argument("--model-triton-seeds", type=int, nargs="*", default=[])
    ap.add_argument("--rne-bf16", action="store_true", help="interpreter: round float32 -> bf16 casts to nearest "
                    "even as the GPU does (Triton 3.6's interpreter truncates them)")
    ap.add_argument("--skip-op-level", action="store_true")
    args = ap.parse_args()
    if args.rne_bf16:
        round_interpreter_bf16_casts()
    if not args.skip_op_level:
        part1({"the model's GDN layers (seeds 0, 1)": captured_op_inputs(0) + captured_op_inputs(1),
               "random model-like inputs": [random_op_inputs(s) for s in range(3)]})
    part2(args.model_seeds, args.model_triton_seeds)


if __name__ == "__main__":
    main()
