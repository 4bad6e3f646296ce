"""Compile the GDN Triton kernels for sm_90a on any machine (no GPU needed) and print ptxas resource usage.

    TRITON_INTERPRET=0 python benchmarks/ptxas_report_gdn.py --K 128 --V 128 --prec tf32
    TRITON_INTERPRET=0 python benchmarks/ptxas_report_gdn.py --kernels bwd_dk --bv-bwd 32 --bwd-warps 8

For each kernel: shared memory per block (the H100 allows 227 KB), registers per thread and spilled bytes, as
reported by the ptxas bundled with Triton. The numbers in docs/benchmarks.md and docs/benchmarks_history.md
("ptxas: ...") come from this.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "0")  # compiled kernels even without a GPU (see ops/triton_runtime.py)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from olmo_hybrid.ops import KernelSettings  # noqa: E402
from olmo_hybrid.ops.gated_delta_rule import chunk_bwd, chunk_common, chunk_fwd  # noqa: E402


def ptxas_report(fn, constexprs: dict, pointer_types: dict, num_warps: int, num_stages: int) -> str:
    names = fn.arg_names
    signature = {}
    for n in names:
        if n in constexprs:
            signature[n] = "constexpr"
        elif n in pointer_types:
            signature[n] = pointer_types[n]
        elif n == "scale":
            signature[n] = "fp32"
        else:
            signature[n] = "i32"
    src = triton.compiler.ASTSource(fn=fn, signature=signature,
                                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    usage = " | ".join(line.split(":", 2)[-1].strip() for line in out.stderr.splitlines()
                       if "registers" in line or "spill" in line)
    return f"shared {kernel.metadata.shared / 1024:.0f} KB | {usage}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=128)
    p.add_argument("--prec", default="tf32", choices=["tf32", "bf16", "ieee"])
    p.add_argument("--kernels", default="prepare,inverse,fwd,dh,bwd_dq,bwd_dk")
    p.add_argument("--bv", type=int, help="V tile of the sequential kernels (default: as the launcher)")
    p.add_argument("--bv-bwd", type=int, help="V tile of the parallel backward kernel (default: as the launcher)")
    p.add_argument("--warps", type=int, help="warps of the sequential kernels (default: as the launcher)")
    p.add_argument("--bwd-warps", type=int, help="warps of the parallel backward kernel (default: as the launcher)")
    p.add_argument("--stages", type=int, default=1)
    args = p.parse_args(argv)
    cfg = chunk_common.kernel_config(args.K, args.V, args.prec, KernelSettings())
    BK = cfg["BK"]
    bv = args.bv or cfg["BV_seq"]
    bv_bwd = args.bv_bwd or cfg["BV_bwd"]
    warps = args.warps or cfg["seq"]["num_warps"]
    bwd_warps = args.bwd_warps or cfg["bwd"]["num_warps"]
    op = "*bf16" if args.prec == "bf16" else "*fp32"
    ptrs = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "o_ptr", "dq_ptr", "dk_ptr", "dv_ptr")}
    ptrs.update({n: "*fp32" for n in ("gamma_ptr", "beta_ptr", "g_ptr", "t0_ptr", "a_ptr", "h0_ptr", "ht_ptr",
                                      "dht_ptr", "dh0_ptr", "dg_ptr", "dbeta_ptr", "dqk_ptr", "dbp_ptr")})
    ptrs.update({n: "*i32" for n in ("reset_ptr", "cu", "coff", "chunk_tok0", "chunk_len")})
    ptrs.update(tg_ptr="*fp32", p_ptr=op, hbuf_ptr=op, dhbuf_ptr=op, vn_ptr=op, dvn_ptr=op)
    flags = dict(HV=16, BT=64, IS_VARLEN=False, HAS_RESET=False)
    common = dict(flags, H=16, K=args.K, V=args.V, BK=BK, L2NORM=True, PREC=args.prec)
    tprec = dict(TPREC=chunk_common.inverse_precision(args.prec))
    todo = {
        "prepare": (chunk_fwd._prepare_kernel, dict(flags, H=16, K=args.K, BK=BK, L2NORM=True, PREC=args.prec),
                    cfg["prep"]["num_warps"]),
        "inverse": (chunk_fwd._inverse_kernel, flags, 1),
        "fwd": (chunk_fwd._fwd_kernel, dict(common, BV=bv, HAS_H0=False, SAVE_H=True, **tprec), warps),
        "dh": (chunk_bwd._bwd_dh_kernel, dict(common, BV=bv, HAS_DHT=False, **tprec), warps),
        "bwd_dq": (chunk_bwd._bwd_dq_kernel, dict(common, BV=bv_bwd), bwd_warps),
        "bwd_dk": (chunk_bwd._bwd_dk_kernel, dict(common, BV=bv_bwd, **tprec), bwd_warps),
    }
    print(f"K={args.K} V={args.V} prec={args.prec} BK={BK} BV(seq)={bv} BV(bwd)={bv_bwd} stages={args.stages}")
    for name in args.kernels.split(","):
        fn, consts, nw = todo[name]
        print(f"{name:8s} warps={nw}: {ptxas_report(fn, consts, ptrs, nw, args.stages)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
