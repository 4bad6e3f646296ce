"""Time the SSD op (the Mamba2 scan) on one GPU at the 1b ladder width, beside our GDN op and mamba_ssm's SSD.

    python benchmarks/bench_ssd.py                         # ssd, gdn, mamba_ssm (if importable), + decode
    python benchmarks/bench_ssd.py --impls ssd --profile   # ours only, with a per-kernel breakdown

Shapes at d_model 2048 (the 1b ladder), B sequences of T tokens (default 2 x 8192), expand 2 (4096 channels):
- ssd, mamba_ssm, shape "ladder": the ladder's Mamba2 (OLMo-core ``model_specs.py``: one head per attention head,
  head dim 2 d_model / heads): x [B, T, 16, 256], state 128, one group: B/C [B, T, 1, 128].
- ssd, mamba_ssm, shape "hd64": mamba_ssm's default head dim 64: x [B, T, 64, 64], B/C [B, T, 1, 128].
- gdn: the 1b hybrid's GDN layer (``config._ladder``): 16 heads, K = 128, V = 256 (the same 4096 value width),
  q/k l2-normalised in the kernel.
Inputs: x, B, C (GDN: q, k, v, beta) bf16; dt = softplus(randn - 1), A = -U(1, 16), D = randn in fp32 (GDN: g =
logsigmoid(randn) fp32). Timing, modes and peak memory exactly as ``bench_gdn.py`` (whose helpers this script
imports): ``triton.testing.do_bench`` medians; "fwd(infer)" under no_grad, "fwd" with inputs requiring grad,
"fwd+bwd" = forward + ``y.backward(dy)``.

mamba_ssm: its Triton ``mamba_chunk_scan_combined`` (chunk 256), from a pure-Python wheel built on a CPU machine
with ``MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip wheel --no-deps --no-build-isolation mamba-ssm``
(plus einops), carried in ``.whl/``. Its package ``__init__`` imports the CUDA selective-scan extension, which
such a wheel lacks, so the Triton modules are imported under a bare ``mamba_ssm`` package object. It is
cross-checked against ours (outputs and every gradient) at the timed shape.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from bench_gdn import bench_fn, environment, kernel_breakdown, peak_extra_gib, rel  # noqa: E402
from bench_gdn import make_inputs as make_gdn_inputs  # noqa: E402

SSD_SHAPES = {"ladder": dict(H=16, P=256, G=1, N=128), "hd64": dict(H=64, P=64, G=1, N=128)}
GDN_SHAPE = dict(H=16, K=128, V=256)
NAMES = ["y", "dx", "ddt", "dA", "dB", "dC", "dD"]


def make_ssd_inputs(Bsz, T, H, P, G, N, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    x = randn(Bsz, T, H, P, dtype=torch.bfloat16)
    dt = F.softplus(randn(Bsz, T, H) - 1.0)
    A = -(1 + 15 * torch.rand(H, device="cuda", generator=gen))
    B = randn(Bsz, T, G, N, dtype=torch.bfloat16)
    C = randn(Bsz, T, G, N, dtype=torch.bfloat16)
    return [t.requires_grad_() for t in (x, dt, A, B, C, randn(H))]


def import_mamba_ssd():
    """mamba_ssm's mamba_chunk_scan_combined without running the package __init__ (see the module docstring)."""
    if "mamba_ssm" not in sys.modules:
        top = importlib.util.find_spec("mamba_ssm")  # locates the package without running its __init__
        if top is None:
            raise ImportError("mamba_ssm is not installed")
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(top.submodule_search_locations)
        sys.modules["mamba_ssm"] = package
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined


def ssd_impls(wanted):
    from olmo_hybrid.ops import ssd
    from olmo_hybrid.ops.ssd.reference import ssd_torch

    impls = {}
    if "ssd" in wanted:
        impls["ssd"] = lambda x, dt, A, B, C, D: ssd(x, dt, A, B, C, D, backend="triton")[0]
    if "torch" in wanted:  # our chunked PyTorch reference, eager (float32 math)
        impls["torch"] = lambda x, dt, A, B, C, D: ssd_torch(x, dt, A, B, C, D)[0]
    if "mamba_ssm" in wanted:
        try:
            scan = import_mamba_ssd()
            impls["mamba_ssm"] = lambda x, dt, A, B, C, D: scan(x, dt, A, B, C, chunk_size=256, D=D)
        except ImportError as e:
            print(f"mamba_ssm unavailable: {e}", flush=True)
    return impls


def reference_errors(fn, shape, T=1024):
    """Relative errors of fn's output and gradients vs the float64 token loop (B=1, T tokens, the timed heads)."""
    from olmo_hybrid.ops import recurrent_ssd

    inputs = make_ssd_inputs(1, T, **shape, seed=1)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    dy = torch.randn_like(inputs[0])
    y = fn(*inputs)
    y.backward(dy)
    y_ref = recurrent_ssd(*ref_in, backend="torch")[0]
    y_ref.backward(dy.double())
    errs = {"y": rel(y, y_ref)}
    errs.update({n: rel(a.grad, b.grad) for n, a, b in zip(NAMES[1:], inputs, ref_in)})
    return errs


def cross_check(fn, ref_fn, inputs, dy):
    outs = []
    for f in (fn, ref_fn):
        for t in inputs:
            t.grad = None
        y = f(*inputs)
        y.backward(dy)
        outs.append([y.detach()] + [t.grad.detach().clone() for t in inputs])
    return {n: rel(a, b) for n, a, b in zip(NAMES, *outs)}


def bench_decode(Bsz=128):
    from triton.testing import do_bench

    from olmo_hybrid.ops import ssd_step

    H, P, G, N = SSD_SHAPES["ladder"].values()
    x, dt, A, B, C, D = (t.detach() for t in make_ssd_inputs(Bsz, 1, H, P, G, N, seed=2))
    args = (x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    state = torch.randn(Bsz, H, P, N, device="cuda") * 0.1
    ms = do_bench(lambda: ssd_step(*args, state, D, inplace=True, backend="triton"), warmup=25, rep=100,
                  return_mode="median")
    nbytes = 2 * state.numel() * 4
    return dict(B=Bsz, H=H, P=P, N=N, us=ms * 1e3, TBps=nbytes / ms / 1e9)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impls", default="ssd,gdn,mamba_ssm", help="ssd, gdn, mamba_ssm, torch (our eager reference)")
    p.add_argument("--shapes", default="ladder,hd64", help=f"comma list of {list(SSD_SHAPES)}")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--modes", default="fwd(infer),fwd,fwd+bwd")
    p.add_argument("--profile", action="store_true", help="per-kernel CUDA time breakdown of fwd+bwd")
    p.add_argument("--decode", action="store_true", help="also time the decode step (B=128)")
    p.add_argument("--json", help="write all results to this file (rewritten after every implementation)")
    args = p.parse_args(argv)
    wanted = args.impls.split(",")
    modes = args.modes.split(",")
    env = environment()
    print(json.dumps(env), flush=True)
    results = dict(env=env, rows=[], reference_errors={}, cross_check={}, breakdown={})

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    def timed(name, fn, inputs, dy, shape):
        row = dict(impl=name, B=args.batch, T=args.seq, **shape)
        for mode in modes:
            row[mode] = bench_fn(fn, inputs, dy, mode)
        row["peak_extra_GiB"] = peak_extra_gib(fn, inputs, dy)
        print(json.dumps(row), flush=True)
        results["rows"].append(row)
        if args.profile:
            bd = kernel_breakdown(fn, inputs, dy)
            results["breakdown"][name] = bd
            for key, ms, cnt in bd[:10]:
                print(f"   {ms:8.3f} ms  x{cnt:<3d} {key[:100]}", flush=True)
        save()

    impls = ssd_impls(wanted)

    def run_ssd(name, shape_name):  # mamba_ssm last: its first calls autotune (compile) every config
        shape = SSD_SHAPES[shape_name]
        inputs = make_ssd_inputs(args.batch, args.seq, **shape)
        dy = torch.randn_like(inputs[0])
        key = f"{shape_name}/{name}"
        if name != "torch":
            errs = reference_errors(impls[name], shape)
            print(key, "vs float64 token loop (B=1, T=1024):", json.dumps(errs), flush=True)
            results["reference_errors"][key] = errs
        timed(key, impls[name], inputs, dy, shape)
        if name != "ssd" and "ssd" in impls:
            diffs = cross_check(impls[name], impls["ssd"], inputs, dy)
            print(f"{key} vs ssd at the timed shape:", json.dumps(diffs), flush=True)
            results["cross_check"][key] = diffs
        del inputs, dy
        torch.cuda.empty_cache()

    for shape_name in args.shapes.split(","):
        for name in [n for n in impls if n != "mamba_ssm"]:
            run_ssd(name, shape_name)
    if "gdn" in wanted:
        from olmo_hybrid.ops import gated_delta_rule

        H, K, V = GDN_SHAPE.values()
        gin = [t.requires_grad_() for t in make_gdn_inputs(args.batch, args.seq, H, K, V)]
        gdy = torch.randn(args.batch, args.seq, H, V, device="cuda", dtype=torch.bfloat16)

        def gdn(q, k, v, g, beta):
            return gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, backend="triton")[0]

        timed("gdn/ours", gdn, gin, gdy, GDN_SHAPE)
        del gin, gdy
    if args.decode:
        row = bench_decode()
        print("decode", json.dumps(row), flush=True)
        results["decode"] = row
        save()
    if "mamba_ssm" in impls:
        for shape_name in args.shapes.split(","):
            run_ssd("mamba_ssm", shape_name)
    print("\nshape/impl        " + "  ".join(f"{m:>11s}" for m in modes) + "   peak GiB")
    for r in results["rows"]:
        print(f"{r['impl']:16s} " + "  ".join(f"{r[m]:9.3f}ms" for m in modes) + f"   {r['peak_extra_GiB']:.2f}")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
