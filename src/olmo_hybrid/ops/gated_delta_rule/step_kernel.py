"""Triton decode kernel: one token of the gated delta rule for a batch of float32 states.

Memory-bound: each program streams one [K, BV] slice of one (batch, value head) state in and out once, so the
kernel moves 2 * 4 * K * V bytes per head. The state may be updated in place (``state_out`` is ``state_in``: each
program reads its slice before writing it) and may be rows of a larger pool (a row stride; each row contiguous).
An ``active`` mask, read on the device, leaves the state of inactive rows untouched (no read or write in place,
copied through otherwise) and writes zeros as their output: no host sync, safe inside a CUDA graph.
"""

from __future__ import annotations

import torch

from ..triton_runtime import tl, triton


@triton.jit
def _step_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, s_in, s_out, active_ptr, o_ptr, scale, stride_in, stride_out,
                 H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, L2NORM: tl.constexpr, HAS_ACTIVE: tl.constexpr, INPLACE: tl.constexpr):
    iv = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HV
    hv = bh % HV
    h = hv // (HV // H)
    o_k = tl.arange(0, BK)
    o_v = iv * BV + tl.arange(0, BV)
    mk = o_k < K
    mv = o_v < V
    m = mk[:, None] & mv[None, :]
    if HAS_ACTIVE:
        act = tl.load(active_ptr + b) != 0
        m_row = m & act
    else:
        m_row = m
    q = tl.load(q_ptr + (b * H + h) * K + o_k, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + (b * H + h) * K + o_k, mask=mk, other=0.0).to(tl.float32)
    if L2NORM:
        q = q * tl.rsqrt(tl.sum(q * q, 0) + 1e-6)
        k = k * tl.rsqrt(tl.sum(k * k, 0) + 1e-6)
    v = tl.load(v_ptr + bh * V + o_v, mask=mv, other=0.0).to(tl.float32)
    decay = tl.exp(tl.load(g_ptr + bh).to(tl.float32))
    beta = tl.load(beta_ptr + bh).to(tl.float32)
    head = hv * K * V + o_k[:, None] * V + o_v[None, :]
    s_old = tl.load(s_in + b.to(tl.int64) * stride_in + head, mask=m_row if INPLACE else m, other=0.0)
    s = s_old * decay
    delta = beta * (v - tl.sum(s * k[:, None], 0))
    s = s + k[:, None] * delta[None, :]
    o = tl.sum(s * (q * tl.cast(scale, tl.float32))[:, None], 0)  # fp32 also when torch.compile passes fp64
    if HAS_ACTIVE:
        o = tl.where(act, o, 0.0)
        if not INPLACE:
            s = tl.where(act, s, s_old)
    tl.store(s_out + b.to(tl.int64) * stride_out + head, s, mask=m_row if INPLACE else m)
    tl.store(o_ptr + bh * V + o_v, o.to(o_ptr.dtype.element_ty), mask=mv)


def step_forward(q, k, v, g, beta, state_in, state_out, active, scale: float, use_l2norm: bool) -> torch.Tensor:
    """q, k [B, H, K]; v [B, HV, V]; g, beta [B, HV]; states [B, HV, K, V] float32 with contiguous rows (the same
    tensor for an in-place update); active bool [B] or None. Returns o [B, HV, V]."""
    B, H, K = q.shape
    HV, V = v.shape[1:]
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    o = torch.empty(B, HV, V, device=q.device, dtype=q.dtype)
    BK = max(16, triton.next_power_of_2(K))
    BV = min(max(16, triton.next_power_of_2(V)), 32 if BK <= 128 else 16)
    has_active = active is not None
    _step_kernel[(triton.cdiv(V, BV), B * HV)](
        q, k, v, g, beta, state_in, state_out, active.contiguous().view(torch.int8) if has_active else o, o, scale,
        state_in.stride(0), state_out.stride(0), H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, L2NORM=use_l2norm,
        HAS_ACTIVE=has_active, INPLACE=state_in is state_out, num_warps=4)
    return o
