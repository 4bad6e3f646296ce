"""The spread of the SSD Triton kernel's bf16 errors against float64 at a tiny shape, over fresh upstream
gradients: the measurement behind the bf16 bar of tests/ops/ssd/test_ssd_triton.py. Runs the kernel in Triton's
CPU interpreter (the same kernel code and bf16 operand rounding as on the GPU); the shape and reset mask are those
of ``test_gpu_small_and_odd_shapes[4-32-2-16-2-16-True]``, whose dA (one value per head, two here) failed the old
1e-2 GPU bar at 1.8e-2 on an H100 on 2026-12-07.

    TRITON_INTERPRET=1 python benchmarks/ssd_bf16_error_spread_cpu.py [n_seeds]
"""

import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "ops" / "ssd"))
from test_ssd_reference import make_inputs, rel_err  # noqa: E402

from olmo_hybrid.ops import recurrent_ssd, ssd  # noqa: E402

NAMES = ["x", "dt", "A", "B", "C", "D"]


def main(n_seeds: int) -> None:
    Bsz, T, H, P, G, N = 4, 32, 2, 16, 2, 16
    reset = torch.rand(Bsz, T, generator=torch.Generator().manual_seed(12)) < 0.1
    reset[:, 0] = True
    inputs = make_inputs(Bsz=Bsz, T=T, H=H, P=P, G=G, N=N, seed=12)
    cast = [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, torch.float32,
            torch.float32]
    worst = dict.fromkeys(NAMES, 0.0)
    print(f"torch {torch.__version__}, Triton interpreter; B{Bsz} T{T} H{H} P{P} G{G} N{N}, resets; bf16 x/B/C")
    for seed in range(n_seeds):
        torch.manual_seed(seed)
        ours = [t.detach().clone().to(c).requires_grad_() for t, c in zip(inputs, cast)]
        ref = [t.detach().double().requires_grad_() for t in ours]
        kw = dict(output_final_state=True, reset_mask=reset)
        y, s = ssd(*ours[:6], initial_state=ours[6], backend="triton", **kw)
        y_ref, s_ref = recurrent_ssd(*ref[:6], initial_state=ref[6], backend="torch", **kw)
        dy, ds = torch.randn_like(y_ref), torch.randn_like(s_ref)
        ((y.double() * dy).sum() + (s.double() * ds).sum()).backward()
        ((y_ref * dy).sum() + (s_ref * ds).sum()).backward()
        errs = {n: rel_err(a.grad, b.grad) for n, a, b in zip(NAMES, ours, ref)}
        worst = {n: max(worst[n], e) for n, e in errs.items()}
        print(f"seed {seed:2d} " + " ".join(f"d{n}={e:.1e}" for n, e in errs.items()), flush=True)
    print("max    " + " ".join(f"d{n}={e:.1e}" for n, e in worst.items()))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 24)
