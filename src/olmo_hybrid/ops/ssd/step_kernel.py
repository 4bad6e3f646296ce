"""Triton decode kernel: one SSD token for a batch of float32 states, in place.

Memory-bound: each program streams one [BP, N] slice of one (row, head) state in and out once. The state rows
may be a row slice of a larger pool (any row stride; each row's [H, P, N] block contiguous). Rows whose
``active`` entry is False are skipped entirely (state untouched, output left at its zeros).
"""

from __future__ import annotations

import torch

from ..triton_runtime import tl, triton


@triton.jit
def _step_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, active_ptr, s_ptr, y_ptr, row_stride,
                 H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, P: tl.constexpr, BN: tl.constexpr,
                 BP: tl.constexpr, HAS_D: tl.constexpr, HAS_ACTIVE: tl.constexpr):
    ip = tl.program_id(0)
    bh = tl.program_id(1)
    row = bh // H
    h = bh % H
    if HAS_ACTIVE:
        if tl.load(active_ptr + row) == 0:
            return
    grp = h // (H // G)
    o_p = ip * BP + tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    mp = o_p < P
    mn = o_n < N
    x = tl.load(x_ptr + bh * P + o_p, mask=mp, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + bh).to(tl.float32)
    decay = tl.exp(dt * tl.load(a_ptr + h).to(tl.float32))
    bvec = tl.load(b_ptr + (row * G + grp) * N + o_n, mask=mn, other=0.0).to(tl.float32)
    cvec = tl.load(c_ptr + (row * G + grp) * N + o_n, mask=mn, other=0.0).to(tl.float32)
    offs = row.to(tl.int64) * row_stride + (h * P + o_p[:, None]).to(tl.int64) * N + o_n[None, :]
    m = mp[:, None] & mn[None, :]
    s = tl.load(s_ptr + offs, mask=m, other=0.0) * decay + (dt * x)[:, None] * bvec[None, :]
    tl.store(s_ptr + offs, s, mask=m)
    y = tl.sum(s * cvec[None, :], 1)
    if HAS_D:
        y += tl.load(d_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + bh * P + o_p, y.to(y_ptr.dtype.element_ty), mask=mp)


def step_inplace(x, dt, A, B, C, D, state, active) -> torch.Tensor:
    """x [R, H, P]; dt [R, H]; B, C [R, G, N]; state [R, H, P, N] float32, updated in place. Returns y [R, H, P]."""
    R, H, P = x.shape
    G, N = B.shape[1:]
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    A = A.float().contiguous()
    y = torch.zeros_like(x) if active is not None else torch.empty_like(x)
    BN = max(16, triton.next_power_of_2(N))
    BP = max(16, min(triton.next_power_of_2(P), 32 if BN <= 128 else 16))
    D32 = D.float().contiguous() if D is not None else A
    _step_kernel[(triton.cdiv(P, BP), R * H)](
        x, dt, A, B, C, D32, active if active is not None else dt, state, y, state.stride(0), H=H, G=G, N=N, P=P,
        BN=BN, BP=BP, HAS_D=D is not None, HAS_ACTIVE=active is not None, num_warps=4)
    return y
