"""Backward kernels of the chunked SSD (notation in ``chunk_fwd.py``).

Given dY and the gradient of the final state, per chunk (S the state entering it, dS' the gradient of the state
leaving it, M = (dY V^T) * Gamma, P = (Q K^T) * Gamma):

    dS = a_last dS' + Q^T diag(a) dY
    dQ = diag(a) dY S^T + M K                 dK = M^T Q + diag(b) V dS'^T
    dV = P^T dY + diag(b) K dS'               dx = dt dV + D dY,   ddt = rowsum(dV x) + A dg,   dD = sum dY x
    dgamma_i: a_i q_i.(dY S^T)_i (through a_i); pairs (dY V^T * P)_ij, i > j, enter +gamma_i, -gamma_j;
              z_j = b_j k_j.(V dS'^T)_j enters -gamma_j, +gamma_last; a_last sum(dS' * S) enters +gamma_last
    dg_t = sum_{i >= t} dgamma_i,             dA = sum_t dt_t dg_t

  _dstates_kernel  reverse-sequential over the chunks of one (sequence, head, N tile, P tile): carries dS in
                   registers, stores dS' for every chunk and the initial state's gradient.
  _dq_kernel       parallel over (chunk, head): dQ and dg's terms through a and the pairs.
  _dkv_kernel      parallel over (chunk, head): dK, dV (folded into dx and ddt), dD, dg's terms through b and
                   a_last. Two kernels rather than one: fused, the [BT, N] accumulators spilled (ptxas).
  dQ and dK are per head; heads sharing a group (G < H) are summed afterwards.
"""

from __future__ import annotations

import torch

from ..gated_delta_rule.chunk_bwd import _pair_dg
from ..gated_delta_rule.chunk_common import CHUNK, as_operand, chunk_coords, gates, load_rows, mm, operand_dtype
from ..gated_delta_rule.chunk_common import seq_coords, store_rows
from ..triton_runtime import tl, triton
from .chunk_fwd import WARPS, _chunk_dt, _load_state_tile, _load_v, _store_state_tile, dot_precision, prepare, tiles


@triton.jit
def _dstates_kernel(dt_ptr, a_ptr, c_ptr, dy_ptr, reset_ptr, dht_ptr, dstates_ptr, dh0_ptr, cu, coff, T,
                    H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, P: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_RESET: tl.constexpr,
                    HAS_DHT: tl.constexpr, PREC: tl.constexpr):
    ik = tl.program_id(0)
    iv = tl.program_id(1)
    nh = tl.program_id(2)
    n = nh // H
    h = nh % H
    grp = h // (H // G)
    k0 = ik * BK
    v0 = iv * BV
    bos, eos, c0 = seq_coords(n, cu, coff, T, BT, IS_VARLEN)
    n_chunks = tl.cdiv(eos - bos, BT)
    row_base = nh.to(tl.int64) * P * N
    if HAS_DHT:
        ds = _load_state_tile(dht_ptr, row_base, N, P, k0, v0, BK, BV, True).to(tl.float32)
    else:
        ds = tl.zeros([BK, BV], dtype=tl.float32)
    A = tl.load(a_ptr + h).to(tl.float32)
    for jj in range(0, n_chunks):
        j = n_chunks - 1 - jj
        tok0 = bos + j * BT
        L = tl.minimum(BT, eos - tok0)
        c = (c0 + j).to(tl.int64)
        _store_state_tile(dstates_ptr, (c * H + h) * N * P, ds, N, P, k0, v0, BK, BV, False)
        dt = _chunk_dt(dt_ptr, tok0, L, h, H, BT)
        a, _, a_last, _, _ = gates(tl.cumsum(dt * A, 0), reset_ptr, tok0, L, BT, HAS_RESET, False)
        q = load_rows(c_ptr + grp * N, tok0, L, G * N, k0, N, BT, BK)
        dy = load_rows(dy_ptr + h * P, tok0, L, H * P, v0, P, BT, BV)
        ds = a_last * ds + mm(tl.trans(as_operand(q * a[:, None], PREC)), as_operand(dy, PREC), PREC)
    _store_state_tile(dh0_ptr, row_base, ds, N, P, k0, v0, BK, BV, True)


@triton.jit
def _dq_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, dy_ptr, reset_ptr, states_ptr, dg_ptr, dq_ptr, chunk_tok0,
               chunk_len, T, H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, P: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_RESET: tl.constexpr,
               PREC: tl.constexpr):
    """Parallel over (chunk, head): dQ and the part of dg from the output (through a and the pairs)."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    grp = h // (H // G)
    tok0, L = chunk_coords(c, chunk_tok0, chunk_len, T, BT, IS_VARLEN)
    if L <= 0:
        return
    c = c.to(tl.int64)
    o_t = tl.arange(0, BT)
    dt = _chunk_dt(dt_ptr, tok0, L, h, H, BT)
    dos = tl.zeros([BT, BK], dtype=tl.float32)  # dY S^T
    dov = tl.zeros([BT, BT], dtype=tl.float32)  # dY V^T
    for v0 in range(0, P, BV):
        s = as_operand(_load_state_tile(states_ptr, (c * H + h) * N * P, N, P, 0, v0, BK, BV, False), PREC)
        _, v = _load_v(x_ptr, dt, tok0, L, h, v0, H, P, BT, BV)
        dy = as_operand(load_rows(dy_ptr + h * P, tok0, L, H * P, v0, P, BT, BV), PREC)
        dos += mm(dy, tl.trans(s), PREC)
        dov += mm(dy, tl.trans(as_operand(v, PREC)), PREC)
    A = tl.load(a_ptr + h).to(tl.float32)
    a, _, _, decay, _ = gates(tl.cumsum(dt * A, 0), reset_ptr, tok0, L, BT, HAS_RESET, True)
    q = load_rows(c_ptr + grp * N, tok0, L, G * N, 0, N, BT, BK)
    dgam = a * tl.sum(q * dos, 1)
    k = as_operand(load_rows(b_ptr + grp * N, tok0, L, G * N, 0, N, BT, BK), PREC)
    pair = dov * mm(as_operand(q, PREC), tl.trans(k), PREC) * decay
    dg = tl.cumsum(dgam, 0, reverse=True) + _pair_dg(tl.where(o_t[:, None] > o_t[None, :], pair, 0.0), BT, PREC)
    tl.store(dg_ptr + (tok0 + o_t).to(tl.int64) * H + h, dg, mask=o_t < L)
    dq = a[:, None] * dos + mm(as_operand(dov * decay, PREC), k, PREC)
    store_rows(dq_ptr + h * N, dq, tok0, L, H * N, 0, N, BT, BK)


@triton.jit
def _dkv_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, dy_ptr, reset_ptr, states_ptr, dstates_ptr, dg_ptr,
                dx_ptr, ddt_ptr, dadt_ptr, dd_ptr, dk_ptr, chunk_tok0, chunk_len, T, H: tl.constexpr,
                G: tl.constexpr, N: tl.constexpr, P: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                BT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_RESET: tl.constexpr, HAS_D: tl.constexpr,
                PREC: tl.constexpr):
    """Parallel over (chunk, head), after _dq_kernel: dK, dx, ddt, the per-token parts of dA and dD, and the rest
    of dg (through b and a_last)."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    grp = h // (H // G)
    tok0, L = chunk_coords(c, chunk_tok0, chunk_len, T, BT, IS_VARLEN)
    if L <= 0:
        return
    c = c.to(tl.int64)
    o_t = tl.arange(0, BT)
    valid = o_t < L
    state_base = (c * H + h) * N * P
    dt = _chunk_dt(dt_ptr, tok0, L, h, H, BT)
    vds = tl.zeros([BT, BK], dtype=tl.float32)  # V dS'^T
    dov = tl.zeros([BT, BT], dtype=tl.float32)  # dY V^T
    dsum = tl.sum(tl.zeros([BT], dtype=tl.float32), 0)  # sum of dS' * S
    for v0 in range(0, P, BV):
        s = _load_state_tile(states_ptr, state_base, N, P, 0, v0, BK, BV, False)
        ds = as_operand(_load_state_tile(dstates_ptr, state_base, N, P, 0, v0, BK, BV, False), PREC)
        dsum += tl.sum(tl.sum(ds.to(tl.float32) * s.to(tl.float32), 1), 0)
        _, v = _load_v(x_ptr, dt, tok0, L, h, v0, H, P, BT, BV)
        v = as_operand(v, PREC)
        dy = as_operand(load_rows(dy_ptr + h * P, tok0, L, H * P, v0, P, BT, BV), PREC)
        vds += mm(v, tl.trans(ds), PREC)
        dov += mm(dy, tl.trans(v), PREC)
    A = tl.load(a_ptr + h).to(tl.float32)
    _, b, a_last, decay, _ = gates(tl.cumsum(dt * A, 0), reset_ptr, tok0, L, BT, HAS_RESET, True)
    k = load_rows(b_ptr + grp * N, tok0, L, G * N, 0, N, BT, BK)
    zsum = b * tl.sum(k * vds, 1)
    k = as_operand(k, PREC)
    q = as_operand(load_rows(c_ptr + grp * N, tok0, L, G * N, 0, N, BT, BK), PREC)
    m_t = tl.trans(as_operand(dov * decay, PREC))
    pm_t = tl.trans(as_operand(mm(q, tl.trans(k), PREC) * decay, PREC))  # P^T, P = (Q K^T) * Gamma
    dk = mm(m_t, q, PREC) + b[:, None] * vds
    store_rows(dk_ptr + h * N, dk, tok0, L, H * N, 0, N, BT, BK)
    if HAS_D:
        d = tl.load(d_ptr + h).to(tl.float32)
    dvx = tl.zeros([BT], dtype=tl.float32)  # rowsum(dV x)
    dyx = tl.zeros([BT], dtype=tl.float32)  # rowsum(dY x)
    for v0 in range(0, P, BV):
        ds = as_operand(_load_state_tile(dstates_ptr, state_base, N, P, 0, v0, BK, BV, False), PREC)
        dy = load_rows(dy_ptr + h * P, tok0, L, H * P, v0, P, BT, BV)
        x = load_rows(x_ptr + h * P, tok0, L, H * P, v0, P, BT, BV)
        dv = mm(pm_t, as_operand(dy, PREC), PREC) + b[:, None] * mm(k, ds, PREC)
        dx = dv * dt[:, None]
        if HAS_D:
            dx += d * dy
        store_rows(dx_ptr + h * P, dx, tok0, L, H * P, v0, P, BT, BV)
        dvx += tl.sum(dv * x, 1)
        dyx += tl.sum(dy * x, 1)
    rows = (tok0 + o_t).to(tl.int64) * H + h
    # + a_last dsum and every z_j of an earlier token: both enter through gamma_last (see the module docstring).
    dg = (tl.load(dg_ptr + rows, mask=valid, other=0.0) + a_last * dsum
          + tl.sum(tl.where(o_t[:, None] < o_t[None, :], zsum[:, None], 0.0), 0))
    tl.store(ddt_ptr + rows, dvx + A * dg, mask=valid)
    tl.store(dadt_ptr + rows, dt * dg, mask=valid)
    tl.store(dd_ptr + rows, dyx, mask=valid)


def chunk_ssd_bwd(x, dt, A, B, C, D, cu_seqlens, reset_mask, states, dy, dht, dot="bf16"):
    """Backward pass. Returns (dx, ddt, dA, dB, dC, dD, dh0); dD (float32, the skip weight's gradient, returned
    even without D) and dh0 are float32."""
    Bsz, T, H, P = x.shape
    G, N = B.shape[2:]
    rows = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    x, dt, A32, B, C, D32, (cu, coff, ctok0, clen, nc), reset = prepare(x, dt, A, B, C, D, cu_seqlens, reset_mask)
    dy = dy.contiguous()
    varlen = cu is not None
    prec = dot_precision(dot, x, B, C)
    t = tiles(N, P)
    dev = x.device
    dummy = A32
    reset_arg = reset if reset is not None else dummy
    flags = dict(IS_VARLEN=varlen, HAS_RESET=reset is not None, PREC=prec)
    dstates = torch.empty(nc, H, N, P, device=dev, dtype=operand_dtype(prec))
    dh0 = torch.empty(rows, H, P, N, device=dev, dtype=torch.float32)
    _dstates_kernel[(triton.cdiv(N, t["BK_seq"]), triton.cdiv(P, t["BV"]), rows * H)](
        dt, A32, C, dy, reset_arg, dht.contiguous() if dht is not None else dummy, dstates, dh0,
        cu if varlen else dummy, coff if varlen else dummy, T, H=H, G=G, N=N, P=P, BK=t["BK_seq"], BV=t["BV"],
        BT=CHUNK, HAS_DHT=dht is not None, num_warps=WARPS["seq"], num_stages=1, **flags)
    dx = torch.empty_like(x)
    f32 = dict(device=dev, dtype=torch.float32)
    dg, ddt, dadt, dd = (torch.empty(Bsz, T, H, **f32) for _ in range(4))
    # Per-head gradients of C and B: final when every head has its own group, else summed over the group below.
    qk_dtype = C.dtype if G == H else (torch.float32 if prec == "ieee" else operand_dtype(prec))
    dq = torch.empty(Bsz, T, H, N, device=dev, dtype=qk_dtype)
    dk = torch.empty(Bsz, T, H, N, device=dev, dtype=qk_dtype)
    meta = dict(H=H, G=G, N=N, P=P, BK=t["BK_full"], BV=t["BV"], BT=CHUNK, num_warps=WARPS["bwd"], num_stages=1,
                **flags)
    tables = (ctok0 if varlen else dummy, clen if varlen else dummy)
    _dq_kernel[(nc, H)](x, dt, A32, B, C, dy, reset_arg, states, dg, dq, *tables, T, **meta)
    _dkv_kernel[(nc, H)](x, dt, A32, B, C, D32 if D32 is not None else dummy, dy, reset_arg, states, dstates, dg,
                         dx, ddt, dadt, dd, dk, *tables, T, HAS_D=D is not None, **meta)
    if G != H:
        dq = dq.view(Bsz, T, G, H // G, N).sum(3, dtype=torch.float32).to(C.dtype)
        dk = dk.view(Bsz, T, G, H // G, N).sum(3, dtype=torch.float32).to(B.dtype)
    dA = dadt.sum((0, 1)).to(A.dtype)
    return dx, ddt.to(dt.dtype), dA, dk, dq, dd.sum((0, 1)), dh0
