"""Triton short causal depthwise convolution (W taps, W = 4 in GDN layers): full sequence, backward, decode step.

    y_t[c] = act(sum_j weight[c, j] * x_{t-(W-1)+j}[c])

Tokens are handled as one packed row of B*T. Document boundaries come in per token as ``doc_start`` (the
packed index of the first token of the token's document) and ``init_row`` (the initial-state row the document
may read for positions before its start, or -1): a tap that falls before ``doc_start`` reads the initial state
or zero, never another document. Without cu_seqlens or reset_mask both are derived from T inside the kernels.
The final conv state and the initial-state gradient are small gathers, done with torch ops. The decode step
takes states that may be rows of a larger pool (a row stride), updates them in place or out of place, and skips
rows that an ``active`` mask (read on the device) marks inactive.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _bounds(t, doc_start_ptr, init_row_ptr, mt, T, HAS_BOUNDS: tl.constexpr):
    if HAS_BOUNDS:
        start = tl.load(doc_start_ptr + t, mask=mt, other=0)
        row = tl.load(init_row_ptr + t, mask=mt, other=-1)
    else:
        start = (t // T) * T
        row = t // T
    return start, row


@triton.jit
def _conv_pre(x_ptr, w_ptr, h0_ptr, t, c, mt, mc, start, row, C, W: tl.constexpr, HAS_H0: tl.constexpr,
              BT: tl.constexpr, BC: tl.constexpr):
    """Pre-activation conv output of rows t, channels c."""
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        src = t - (W - 1) + j
        wj = tl.load(w_ptr + c * W + j, mask=mc, other=0.0).to(tl.float32)
        inside = src >= start
        xv = tl.load(x_ptr + src.to(tl.int64)[:, None] * C + c[None, :],
                     mask=(inside & mt)[:, None] & mc[None, :], other=0.0).to(tl.float32)
        acc += wj[None, :] * xv
        if HAS_H0:
            pos = src - start + (W - 1)
            use = (~inside) & (row >= 0) & mt
            hv = tl.load(h0_ptr + (row * C)[:, None] * (W - 1) + c[None, :] * (W - 1) + pos[:, None],
                         mask=use[:, None] & mc[None, :], other=0.0).to(tl.float32)
            acc += wj[None, :] * hv
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, h0_ptr, doc_start_ptr, init_row_ptr, y_ptr, NTOK, T, C, W: tl.constexpr,
                     BT: tl.constexpr, BC: tl.constexpr, HAS_BOUNDS: tl.constexpr, HAS_H0: tl.constexpr,
                     SILU: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mt = t < NTOK
    mc = c < C
    start, row = _bounds(t, doc_start_ptr, init_row_ptr, mt, T, HAS_BOUNDS)
    y = _conv_pre(x_ptr, w_ptr, h0_ptr, t, c, mt, mc, start, row, C, W, HAS_H0, BT, BC)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + t.to(tl.int64)[:, None] * C + c[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mt[:, None] & mc[None, :])


@triton.jit
def _conv_dpre_kernel(x_ptr, w_ptr, h0_ptr, doc_start_ptr, init_row_ptr, dy_ptr, dpre_ptr, NTOK, T, C,
                      W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_BOUNDS: tl.constexpr,
                      HAS_H0: tl.constexpr):
    """dpre = dy * silu'(pre), recomputing pre."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mt = t < NTOK
    mc = c < C
    start, row = _bounds(t, doc_start_ptr, init_row_ptr, mt, T, HAS_BOUNDS)
    pre = _conv_pre(x_ptr, w_ptr, h0_ptr, t, c, mt, mc, start, row, C, W, HAS_H0, BT, BC)
    offs = t.to(tl.int64)[:, None] * C + c[None, :]
    m = mt[:, None] & mc[None, :]
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(pre)
    tl.store(dpre_ptr + offs, dy * sig * (1.0 + pre * (1.0 - sig)), mask=m)


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, h0_ptr, doc_start_ptr, init_row_ptr, dpre_ptr, dx_ptr, dw_part_ptr, NTOK, T,
                     C, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_BOUNDS: tl.constexpr,
                     HAS_H0: tl.constexpr):
    """dx for rows s of this tile, and this tile's partial dweight [C, W] (rows t of the tile as outputs)."""
    it = tl.program_id(0)
    s = it * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    ms = s < NTOK
    mc = c < C
    start_s, row_s = _bounds(s, doc_start_ptr, init_row_ptr, ms, T, HAS_BOUNDS)
    dpre_s = tl.load(dpre_ptr + s.to(tl.int64)[:, None] * C + c[None, :], mask=ms[:, None] & mc[None, :],
                     other=0.0)
    dx = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        wj = tl.load(w_ptr + c * W + j, mask=mc, other=0.0).to(tl.float32)
        # dx: output token t = s + (W-1) - j read x_s through tap j if s is inside t's document.
        t = s + (W - 1) - j
        mt = t < NTOK
        start_t, _ = _bounds(t, doc_start_ptr, init_row_ptr, mt, T, HAS_BOUNDS)
        ok = mt & ms & (start_t <= s)
        dpre_t = tl.load(dpre_ptr + t.to(tl.int64)[:, None] * C + c[None, :], mask=ok[:, None] & mc[None, :],
                         other=0.0)
        dx += wj[None, :] * dpre_t
        # dweight: output rows s read tap j at src = s - (W-1) + j.
        src = s - (W - 1) + j
        inside = src >= start_s
        xv = tl.load(x_ptr + src.to(tl.int64)[:, None] * C + c[None, :],
                     mask=(inside & ms)[:, None] & mc[None, :], other=0.0).to(tl.float32)
        if HAS_H0:
            pos = src - start_s + (W - 1)
            use = (~inside) & (row_s >= 0) & ms
            xv += tl.load(h0_ptr + (row_s * C)[:, None] * (W - 1) + c[None, :] * (W - 1) + pos[:, None],
                          mask=use[:, None] & mc[None, :], other=0.0).to(tl.float32)
        tl.store(dw_part_ptr + (it * C + c) * W + j, tl.sum(dpre_s * xv, 0), mask=mc)
    tl.store(dx_ptr + s.to(tl.int64)[:, None] * C + c[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=ms[:, None] & mc[None, :])


_BT, _BC = 64, 128


def conv_bounds(B: int, T: int, cu_seqlens: Optional[Tensor], reset_mask: Optional[Tensor], device):
    """Per-token (doc_start, init_row) int32 [B*T], or (None, None) when rows of length T are the documents."""
    if cu_seqlens is None and reset_mask is None:
        return None, None
    idx = torch.arange(B * T, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        row = torch.searchsorted(cu[1:], idx, right=True)
        row_start = cu[row]
    else:
        row = idx // T
        row_start = row * T
    reset = reset_mask.reshape(-1) if reset_mask is not None else torch.zeros_like(idx, dtype=torch.bool)
    marks = reset | (idx == row_start)
    doc_start = torch.cummax(torch.where(marks, idx, 0), 0).values
    init_row = torch.where((doc_start == row_start) & ~reset[doc_start], row, -1)
    return doc_start.to(torch.int32), init_row.to(torch.int32)


def _launch_args(x, weight, initial_state, doc_start, init_row):
    """Optional pointer arguments (x stands in for absent ones; the kernels never read them) and the grid."""
    B, T, C = x.shape
    ptrs = dict(h0_ptr=initial_state if initial_state is not None else x,
                doc_start_ptr=doc_start if doc_start is not None else x,
                init_row_ptr=init_row if init_row is not None else x)
    return ptrs, (triton.cdiv(B * T, _BT), triton.cdiv(C, _BC))


def conv_fwd(x, weight, initial_state, doc_start, init_row, silu: bool) -> Tensor:
    B, T, C = x.shape
    x, weight = x.contiguous(), weight.contiguous()
    initial_state = initial_state.contiguous() if initial_state is not None else None
    y = torch.empty_like(x)
    ptrs, grid = _launch_args(x, weight, initial_state, doc_start, init_row)
    _conv_fwd_kernel[grid](x_ptr=x, w_ptr=weight, y_ptr=y, NTOK=B * T, T=T, C=C, W=weight.shape[1], BT=_BT, BC=_BC,
                           HAS_BOUNDS=doc_start is not None, HAS_H0=initial_state is not None, SILU=silu,
                           num_warps=4, **ptrs)
    return y


def conv_bwd(x, weight, initial_state, doc_start, init_row, silu: bool, dy):
    """Returns (dx, dweight, dinitial_state or an empty tensor)."""
    B, T, C = x.shape
    W = weight.shape[1]
    x, weight, dy = x.contiguous(), weight.contiguous(), dy.contiguous()
    initial_state = initial_state.contiguous() if initial_state is not None else None
    ptrs, grid = _launch_args(x, weight, initial_state, doc_start, init_row)
    flags = dict(NTOK=B * T, T=T, C=C, W=W, BT=_BT, BC=_BC, HAS_BOUNDS=doc_start is not None,
                 HAS_H0=initial_state is not None, num_warps=4)
    if silu:
        dpre = torch.empty(B * T, C, device=x.device, dtype=torch.float32)
        _conv_dpre_kernel[grid](x_ptr=x, w_ptr=weight, dy_ptr=dy, dpre_ptr=dpre, **ptrs, **flags)
    else:
        dpre = dy.reshape(B * T, C).float()
    dx = torch.empty_like(x)
    dw_part = torch.empty(grid[0], C, W, device=x.device, dtype=torch.float32)
    _conv_bwd_kernel[grid](x_ptr=x, w_ptr=weight, dpre_ptr=dpre, dx_ptr=dx, dw_part_ptr=dw_part, **ptrs, **flags)
    dw = dw_part.sum(0).to(weight.dtype)
    if initial_state is None:
        return dx, dw, x.new_empty(0)
    return dx, dw, _initial_state_grad(dpre, weight, initial_state, B, T, doc_start, init_row)


def _initial_state_grad(dpre, weight, initial_state, B, T, doc_start, init_row):
    """d initial_state[n, c, p] = sum_{j <= p} w[c, j] dpre[row_start_n + p - j, c] over tokens that read it."""
    N, C, Wm1 = initial_state.shape
    dev = dpre.device
    if doc_start is None:
        row_start = torch.arange(N, device=dev) * T
        row_end = row_start + T
    else:  # rows are the init_row values; a row's start is the doc_start of its first token
        ntok = dpre.shape[0]
        tok_rows = init_row.long()
        sel = tok_rows >= 0
        first = torch.full((N,), ntok, device=dev, dtype=torch.long).scatter_reduce(
            0, tok_rows[sel], torch.arange(ntok, device=dev)[sel], reduce="amin")
        row_start = first
        row_end = torch.full((N,), 0, device=dev, dtype=torch.long).scatter_reduce(
            0, tok_rows[sel], torch.arange(ntok, device=dev)[sel] + 1, reduce="amax")
    grad = torch.zeros(N, C, Wm1, device=dev, dtype=torch.float32)
    w = weight.float()
    for p in range(Wm1):
        for j in range(p + 1):
            t = row_start + p - j
            ok = t < row_end
            grad[:, :, p] += torch.where(ok[:, None], w[:, j] * dpre[t.clamp(max=dpre.shape[0] - 1)], 0.0)
    return grad.to(initial_state.dtype)


def conv_final_state(x, initial_state, W: int, B: int, T: int, cu_seqlens, reset_mask):
    """The last W-1 inputs of each row/sequence [N, C, W-1] (torch gathers; differentiable)."""
    if cu_seqlens is None and reset_mask is None and T >= W - 1:
        # One slice; the general gathers below cost ~45 small launches, which left prefill host-bound on an H100.
        return x[:, T - (W - 1):].transpose(1, 2).contiguous()
    C = x.shape[-1]
    flat = x.reshape(B * T, C)
    dev = x.device
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=dev, dtype=torch.int64)
        starts, ends = cu[:-1], cu[1:]
    else:
        starts = torch.arange(B, device=dev) * T
        ends = starts + T
    N = starts.numel()
    if initial_state is None:
        initial_state = x.new_zeros(N, C, W - 1)
    if reset_mask is not None:  # positions at or after the last reset of the row belong to its last document
        reset = reset_mask.reshape(-1)
        idx = torch.arange(B * T, device=dev)
        last_reset = torch.cummax(torch.where(reset, idx, -1), 0).values
        last_doc = torch.where(ends > starts, last_reset[(ends - 1).clamp(min=0)], -1)
        doc_start = torch.maximum(starts, last_doc)
        keep_init = last_doc < starts
    else:
        doc_start = starts
        keep_init = torch.ones(N, device=dev, dtype=torch.bool)
    cols = []
    for i in range(W - 1):
        pos = ends - (W - 1) + i  # packed index of the i-th of the last W-1 inputs
        from_x = pos >= doc_start
        xv = flat[pos.clamp(0, B * T - 1)]
        hv = initial_state[torch.arange(N, device=dev), :, (pos - starts + W - 1).clamp(0, W - 2)]
        hv = torch.where((keep_init & (pos >= starts - (W - 1)))[:, None], hv.to(x.dtype), 0.0)
        cols.append(torch.where(from_x[:, None], xv, hv))
    return torch.stack(cols, dim=-1)


@triton.jit
def _conv_step_kernel(x_ptr, s_in, s_out, w_ptr, active_ptr, y_ptr, C, stride_in, stride_out, W: tl.constexpr,
                      BC: tl.constexpr, SILU: tl.constexpr, HAS_ACTIVE: tl.constexpr, INPLACE: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = c < C
    if HAS_ACTIVE:
        act = tl.load(active_ptr + b) != 0
        m_row = mc & act
    else:
        m_row = mc
    m_state = m_row if INPLACE else mc  # in place, inactive rows are neither read nor written
    x = tl.load(x_ptr + b * C + c, mask=mc, other=0.0).to(tl.float32)
    acc = tl.load(w_ptr + c * W + (W - 1), mask=mc, other=0.0).to(tl.float32) * x
    base_in = b.to(tl.int64) * stride_in + c * (W - 1)
    base_out = b.to(tl.int64) * stride_out + c * (W - 1)
    for j in tl.static_range(W - 1):
        prev = tl.load(s_in + base_in + j, mask=m_state, other=0.0)
        acc += tl.load(w_ptr + c * W + j, mask=mc, other=0.0).to(tl.float32) * prev.to(tl.float32)
    # Every slot is read above before any is written here, so s_out may be s_in.
    for j in tl.static_range(W - 1):
        if j + 1 < W - 1:
            nxt = tl.load(s_in + base_in + j + 1, mask=m_state, other=0.0)
        else:
            nxt = x.to(s_out.dtype.element_ty)
        if HAS_ACTIVE and not INPLACE:  # inactive rows copied through
            nxt = tl.where(act, nxt, tl.load(s_in + base_in + j, mask=mc, other=0.0))
        tl.store(s_out + base_out + j, nxt, mask=m_state)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    if HAS_ACTIVE:
        acc = tl.where(act, acc, 0.0)
    tl.store(y_ptr + b * C + c, acc.to(y_ptr.dtype.element_ty), mask=mc)


def conv_step(x, state_in, state_out, weight, active, silu: bool) -> Tensor:
    """x [B, C]; states [B, C, W-1] with contiguous rows (the same tensor for an in-place update); active bool [B]
    or None."""
    B, C = x.shape
    W = weight.shape[1]
    x = x.contiguous()
    y = torch.empty_like(x)
    _conv_step_kernel[(B, triton.cdiv(C, 256))](
        x, state_in, state_out, weight.contiguous(), active.contiguous().view(torch.int8) if active is not None else x,
        y, C, state_in.stride(0), state_out.stride(0), W=W, BC=256, SILU=silu, HAS_ACTIVE=active is not None,
        INPLACE=state_in is state_out, num_warps=4)
    return y
