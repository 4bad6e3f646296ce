"""Time the gated delta rule and causal conv torch references, forward and forward+backward.

    python benchmarks/ops_gdn_cpu.py                       # tiny-training shapes (H=4, K=48, V=96)
    python benchmarks/ops_gdn_cpu.py --shape 16,512 --threads 2 --repeats 5

Reports the minimum over repeats of wall time and of process CPU time (CPU time is the steadier number on a
shared machine; with N threads it can reach N x wall).
"""

from __future__ import annotations

import argparse
import time

import torch

from olmo_hybrid.ops import causal_conv1d, gated_delta_rule, recurrent_gated_delta_rule


def measure(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return min(wall) * 1e3, min(cpu) * 1e3


def gdn_case(op, B, T, H, K, V, resets: bool, backward: bool):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, K, generator=gen).requires_grad_(backward)
    k = torch.randn(B, T, H, K, generator=gen).requires_grad_(backward)
    v = torch.randn(B, T, H, V, generator=gen).requires_grad_(backward)
    g = (-torch.rand(B, T, H, generator=gen)).requires_grad_(backward)
    beta = (2 * torch.rand(B, T, H, generator=gen)).requires_grad_(backward)
    reset = (torch.rand(B, T, generator=gen) < 1 / 200) if resets else None
    do = torch.randn(B, T, H, V, generator=gen)

    def step():
        with torch.set_grad_enabled(backward):
            o, _ = op(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, reset_mask=reset, backend="torch")
            if backward:
                (o * do).sum().backward()
    return step


def conv_case(B, T, C, resets: bool, backward: bool):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, C, generator=gen).requires_grad_(backward)
    w = torch.randn(C, 4, generator=gen).requires_grad_(backward)
    reset = (torch.rand(B, T, generator=gen) < 1 / 200) if resets else None

    def step():
        with torch.set_grad_enabled(backward):
            y, _ = causal_conv1d(x, w, reset_mask=reset, backend="torch")
            if backward:
                y.sum().backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help="B,T (repeatable); default 8,256 and 16,512")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--key-dim", type=int, default=48)
    parser.add_argument("--value-dim", type=int, default=96)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop", action="store_true", help="also time the token-loop form")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(map(int, s.split(","))) for s in (args.shape or ["8,256", "16,512"])]
    H, K, V = args.heads, args.key_dim, args.value_dim
    print(f"torch {torch.__version__}, {args.threads} threads, H={H} K={K} V={V}; min of {args.repeats} runs")
    print(f"{'op':<34}{'B':>4}{'T':>6}{'wall ms':>10}{'cpu ms':>10}")
    for B, T in shapes:
        cases = [("gdn chunk fwd", gdn_case(gated_delta_rule, B, T, H, K, V, False, False)),
                 ("gdn chunk fwd+bwd", gdn_case(gated_delta_rule, B, T, H, K, V, False, True)),
                 ("gdn chunk fwd+bwd, reset_mask", gdn_case(gated_delta_rule, B, T, H, K, V, True, True)),
                 ("conv q+k+v fwd+bwd, reset_mask", conv_case(B, T, H * (2 * K + V), True, True))]
        if args.loop:
            cases.append(("gdn loop fwd+bwd", gdn_case(recurrent_gated_delta_rule, B, T, H, K, V, False, True)))
        for name, fn in cases:
            wall, cpu = measure(fn, args.repeats)
            print(f"{name:<34}{B:>4}{T:>6}{wall:>10.1f}{cpu:>10.1f}")


if __name__ == "__main__":
    main()
