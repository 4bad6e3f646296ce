"""Triton kernels for the chunked gated delta rule (training / prefill): the forward kernels and their launcher.

Per value head, with the state S [K, V] entering a chunk of C = 64 tokens (positions i, j in the chunk),
gamma = chunk-local cumsum of g, and Gamma[i, j] = exp(gamma_i - gamma_j) for j <= i in the same document:

    T0  = (I + strict_tril(diag(beta) K K^T))^-1           (gate-free: does not depend on g)
    Tg  = T0 * Gamma                                       (the gated inverse, elementwise)
    X   = diag(beta) (V - diag(a) K S)                      a_i = exp(gamma_i)
    Vn  = Tg X                                              (the per-token deltas)           
    O   = diag(a) Q S + ((Q K^T) * Gamma) Vn
    S'  = a_C S + K^T diag(b) Vn                            b_i = exp(gamma_C - gamma_i), a_C = exp(gamma_C)

(q carries the scale.) The gated inverse equals the ungated one times the decay mask because the decay is a
diagonal similarity: (I + D A D^-1)^-1 = D (I + A)^-1 D^-1. Document resets (``reset_mask``) zero the mask
entries that cross a reset, and a_i / b_i / a_C for tokens that cannot see the entering state / reach the end.

Forward kernels (one launch each; the backward ones are in ``chunk_bwd.py``, the helpers both use in
``chunk_common.py``):
  _prepare_kernel  parallel over (chunk, head): gamma (fp32), A0 = strict_tril(diag(beta) K K^T) and
                   P = (Q K^T) * Gamma, the output operand of the sequential kernels.
  _inverse_kernel  parallel over (chunk, head), one warp: T0 = (I + A0)^-1 by 16x16 blocks (in place of A0)
                   and Tg = T0 * Gamma.
  _fwd_kernel      sequential over the chunks of one (sequence, head, V tile): S in registers (fp32), writes O
                   and, for training, the state entering each chunk and Vn (both in the dot operand dtype), which
                   the backward reads instead of recomputing them. W and U are never stored.
Exponents are always differences gamma_i - gamma_j with i >= j (<= 0), so nothing overflows for g <= 0.

Dot precision: see ``chunk_common.py``; ``KernelSettings`` (``olmo_hybrid/config.py``) chooses it and the
tiles and warps.
"""

from __future__ import annotations

import torch

from olmo_hybrid.config import KernelSettings
from ..triton_runtime import tl, triton
from .chunk_common import (
    CHUNK,
    as_operand,
    chunk_coords,
    chunk_tables,
    dot_precision,
    gates,
    inverse_precision,
    kernel_config,
    load_chunk_matrix,
    load_gamma,
    load_qk,
    load_rows,
    load_state,
    mm,
    operand_dtype,
    seq_coords,
    store_rows,
    store_state,
)


@triton.jit
def _vec_block(ptr, tok0, L, i, stride_t, other):
    o = tl.arange(0, 16)
    return tl.load(ptr + (tok0 + 16 * i + o).to(tl.int64) * stride_t, mask=16 * i + o < L, other=other)


@triton.jit
def _seg_block(reset_ptr, tok0, L, i, seg0):
    o = tl.arange(0, 16)
    r = tl.load(reset_ptr + tok0 + 16 * i + o, mask=16 * i + o < L, other=0).to(tl.int32)
    seg = seg0 + tl.cumsum(r, 0)
    return seg, seg0 + tl.sum(r, 0)


@triton.jit
def _unit_lower_inverse16(a):
    """(I + a)^-1 for a strictly lower-triangular 16x16 block, by forward substitution over rows."""
    o = tl.arange(0, 16)
    t = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    for i in tl.static_range(1, 16):
        a_i = tl.sum(tl.where(o[:, None] == i, a, 0.0), 0)  # row i of a
        t = tl.where(o[:, None] == i, t - tl.sum(a_i[:, None] * t, 0)[None, :], t)
    return t


@triton.jit
def _block_ptrs(base, i, j):
    o = tl.arange(0, 16)
    return base + (16 * i + o)[:, None] * 64 + (16 * j + o)[None, :]


@triton.jit
def _store_pair(t0_base, tg_base, t, gi, gj, si, sj, L, i: tl.constexpr, j: tl.constexpr,
                HAS_RESET: tl.constexpr):
    """Store block (i, j) of T0 and of Tg = T0 * Gamma (Gamma from the blocks' gammas and document ids)."""
    o = tl.arange(0, 16)
    ok = ((16 * i + o)[:, None] < L) & ((16 * j + o)[None, :] < L)
    if i == j:
        ok = ok & (o[:, None] >= o[None, :])
    if HAS_RESET:
        ok = ok & (si[:, None] == sj[None, :])
    decay = tl.exp(tl.where(ok, gi[:, None] - gj[None, :], float("-inf")))
    tl.store(_block_ptrs(t0_base, i, j), t)
    tl.store(_block_ptrs(tg_base, i, j), (t * decay).to(tg_base.dtype.element_ty))


@triton.jit
def _prepare_kernel(q_ptr, k_ptr, g_ptr, beta_ptr, reset_ptr, chunk_tok0, chunk_len, gamma_ptr, a_ptr, p_ptr, T,
                    scale, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                    IS_VARLEN: tl.constexpr, HAS_RESET: tl.constexpr, L2NORM: tl.constexpr, PREC: tl.constexpr):
    """gamma = chunk-local cumsum of g; A0 = strict_tril(diag(beta) K K^T) (same document; stored fp32, inverted
    in place by _inverse_kernel); P = (Q K^T) * Gamma, the output operand of the sequential kernels."""
    c = tl.program_id(0)
    hv = tl.program_id(1)
    tok0, L = chunk_coords(c, chunk_tok0, chunk_len, T, BT, IS_VARLEN)
    if L <= 0:
        return
    o_t = tl.arange(0, BT)
    valid = o_t < L
    g = tl.load(g_ptr + (tok0 + o_t).to(tl.int64) * HV + hv, mask=valid, other=0.0).to(tl.float32)
    gam = tl.cumsum(g, 0)
    tl.store(gamma_ptr + (tok0 + o_t).to(tl.int64) * HV + hv, gam, mask=valid)
    beta = tl.load(beta_ptr + (tok0 + o_t).to(tl.int64) * HV + hv, mask=valid, other=0.0).to(tl.float32)
    a, b, a_last, decay, causal = gates(gam, reset_ptr, tok0, L, BT, HAS_RESET, True)
    q, k = load_qk(q_ptr, k_ptr, tok0, L, hv // (HV // H), scale, H, K, BT, BK, L2NORM, PREC)
    tile = (c.to(tl.int64) * HV + hv) * BT * BT + o_t[:, None] * BT + o_t[None, :]
    kk = mm(k, tl.trans(k), PREC)
    tl.store(a_ptr + tile, tl.where(causal & (o_t[:, None] > o_t[None, :]), beta[:, None] * kk, 0.0))
    tl.store(p_ptr + tile, (mm(q, tl.trans(k), PREC) * decay).to(p_ptr.dtype.element_ty))


@triton.jit
def _inverse_kernel(a_ptr, tg_ptr, gamma_ptr, reset_ptr, chunk_tok0, chunk_len, T, HV: tl.constexpr,
                    BT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_RESET: tl.constexpr):
    """T0 = (I + A0)^-1 by 16x16 blocks (in place of A0) and Tg = T0 * Gamma. Meant for one warp: the row
    substitutions reduce over 16x16 tiles, which across several warps costs a barrier per step."""
    c = tl.program_id(0)
    hv = tl.program_id(1)
    tok0, L = chunk_coords(c, chunk_tok0, chunk_len, T, BT, IS_VARLEN)
    if L <= 0:
        return
    base = a_ptr + (c.to(tl.int64) * HV + hv) * BT * BT
    tg_base = tg_ptr + (c.to(tl.int64) * HV + hv) * BT * BT
    t00 = _unit_lower_inverse16(tl.load(_block_ptrs(base, 0, 0)))
    t11 = _unit_lower_inverse16(tl.load(_block_ptrs(base, 1, 1)))
    t22 = _unit_lower_inverse16(tl.load(_block_ptrs(base, 2, 2)))
    t33 = _unit_lower_inverse16(tl.load(_block_ptrs(base, 3, 3)))
    a10 = tl.load(_block_ptrs(base, 1, 0))
    a20 = tl.load(_block_ptrs(base, 2, 0))
    a21 = tl.load(_block_ptrs(base, 2, 1))
    a30 = tl.load(_block_ptrs(base, 3, 0))
    a31 = tl.load(_block_ptrs(base, 3, 1))
    a32 = tl.load(_block_ptrs(base, 3, 2))
    # Block forward substitution: T_ij = -T_ii sum_{j <= m < i} A_im T_mj.
    t10 = -tl.dot(t11, tl.dot(a10, t00, input_precision="ieee"), input_precision="ieee")
    t21 = -tl.dot(t22, tl.dot(a21, t11, input_precision="ieee"), input_precision="ieee")
    t32 = -tl.dot(t33, tl.dot(a32, t22, input_precision="ieee"), input_precision="ieee")
    t20 = -tl.dot(t22, tl.dot(a20, t00, input_precision="ieee") + tl.dot(a21, t10, input_precision="ieee"),
                  input_precision="ieee")
    t31 = -tl.dot(t33, tl.dot(a31, t11, input_precision="ieee") + tl.dot(a32, t21, input_precision="ieee"),
                  input_precision="ieee")
    t30 = -tl.dot(t33, tl.dot(a30, t00, input_precision="ieee") + tl.dot(a31, t10, input_precision="ieee")
                  + tl.dot(a32, t20, input_precision="ieee"), input_precision="ieee")
    gh = gamma_ptr + hv
    g0 = _vec_block(gh, tok0, L, 0, HV, 0.0)
    g1 = _vec_block(gh, tok0, L, 1, HV, 0.0)
    g2 = _vec_block(gh, tok0, L, 2, HV, 0.0)
    g3 = _vec_block(gh, tok0, L, 3, HV, 0.0)
    if HAS_RESET:
        s0, n0 = _seg_block(reset_ptr, tok0, L, 0, 0)
        s1, n1 = _seg_block(reset_ptr, tok0, L, 1, n0)
        s2, n2 = _seg_block(reset_ptr, tok0, L, 2, n1)
        s3, n3 = _seg_block(reset_ptr, tok0, L, 3, n2)
    else:
        s0 = 0
        s1 = 0
        s2 = 0
        s3 = 0
    zero = tl.zeros([16, 16], dtype=tl.float32)
    _store_pair(base, tg_base, t00, g0, g0, s0, s0, L, 0, 0, HAS_RESET)
    _store_pair(base, tg_base, t10, g1, g0, s1, s0, L, 1, 0, HAS_RESET)
    _store_pair(base, tg_base, t11, g1, g1, s1, s1, L, 1, 1, HAS_RESET)
    _store_pair(base, tg_base, t20, g2, g0, s2, s0, L, 2, 0, HAS_RESET)
    _store_pair(base, tg_base, t21, g2, g1, s2, s1, L, 2, 1, HAS_RESET)
    _store_pair(base, tg_base, t22, g2, g2, s2, s2, L, 2, 2, HAS_RESET)
    _store_pair(base, tg_base, t30, g3, g0, s3, s0, L, 3, 0, HAS_RESET)
    _store_pair(base, tg_base, t31, g3, g1, s3, s1, L, 3, 1, HAS_RESET)
    _store_pair(base, tg_base, t32, g3, g2, s3, s2, L, 3, 2, HAS_RESET)
    _store_pair(base, tg_base, t33, g3, g3, s3, s3, L, 3, 3, HAS_RESET)
    for i in tl.static_range(0, 3):
        for j in tl.static_range(i + 1, 4):
            tl.store(_block_ptrs(base, i, j), zero)
            tl.store(_block_ptrs(tg_base, i, j), zero.to(tg_base.dtype.element_ty))


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, gamma_ptr, beta_ptr, reset_ptr, tg_ptr, p_ptr, h0_ptr, o_ptr, ht_ptr, hbuf_ptr,
                vn_ptr, cu, coff, T, scale, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr,
                HAS_RESET: tl.constexpr, HAS_H0: tl.constexpr, SAVE_H: tl.constexpr, L2NORM: tl.constexpr,
                PREC: tl.constexpr, TPREC: tl.constexpr):
    iv = tl.program_id(0)
    n = tl.program_id(1)
    hv = tl.program_id(2)
    h = hv // (HV // H)
    v0 = iv * BV
    bos, eos, c0 = seq_coords(n, cu, coff, T, BT, IS_VARLEN)
    n_chunks = tl.cdiv(eos - bos, BT)
    if HAS_H0:
        s = load_state(h0_ptr, (n * HV + hv).to(tl.int64) * K * V, K, V, v0, BK, BV)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
    bh = beta_ptr + hv
    for j in range(0, n_chunks):
        tok0 = bos + j * BT
        L = tl.minimum(BT, eos - tok0)
        c = (c0 + j).to(tl.int64)
        if SAVE_H:
            store_state(hbuf_ptr, (c * HV + hv) * K * V, s, K, V, v0, BK, BV)
        q, k = load_qk(q_ptr, k_ptr, tok0, L, h, scale, H, K, BT, BK, L2NORM, PREC)
        s_op = as_operand(s, PREC)
        o_t = tl.arange(0, BT)
        beta = tl.load(bh + (tok0 + o_t).to(tl.int64) * HV, mask=o_t < L, other=0.0).to(tl.float32)
        gam = load_gamma(gamma_ptr, tok0, L, hv, HV, BT)
        a, b, a_last, _, _ = gates(gam, reset_ptr, tok0, L, BT, HAS_RESET, False)
        v = load_rows(v_ptr + hv * V, tok0, L, HV * V, v0, V, BT, BV)
        x = beta[:, None] * (v - a[:, None] * mm(k, s_op, PREC))
        vn = as_operand(mm(load_chunk_matrix(tg_ptr, c, hv, HV, BT), x, TPREC), PREC)
        o = a[:, None] * mm(q, s_op, PREC) + mm(load_chunk_matrix(p_ptr, c, hv, HV, BT), vn, PREC)
        store_rows(o_ptr + hv * V, o, tok0, L, HV * V, v0, V, BT, BV)
        if SAVE_H:
            store_rows(vn_ptr + hv * V, vn, tok0, L, HV * V, v0, V, BT, BV)
        s = a_last * s + mm(tl.trans(as_operand(k * b[:, None], PREC)), vn, PREC)
    store_state(ht_ptr, (n * HV + hv).to(tl.int64) * K * V, s, K, V, v0, BK, BV)


# ------------------------------------------------------------------------------------------------------------
# Launchers. Tensors are [B, T, heads, dim] (time-major, as the public op); everything is viewed as one packed
# row of B*T tokens, so fixed-length batches and cu_seqlens share the kernels.


def chunk_gdr_fwd(q, k, v, g, beta, scale, initial_state, cu_seqlens, reset_mask, use_l2norm, save_states,
                  settings: KernelSettings):
    """Forward pass. Returns (o, final_state, gamma, tt, p, states, vn): gamma the chunk-local cumsum of g, tt the
    stacked [T0, Tg] (gate-free and gated inverses, fp32), p the output operand P; states (per-chunk entering
    states) and vn (the per-token deltas Vn, [B, T, HV, V]) are empty unless save_states. p, states and vn are kept
    in the dot operand dtype (``operand_dtype``): the backward only reads them as dot operands."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    cu, coff, ctok0, clen, nc = chunk_tables(cu_seqlens, B, T)
    varlen = cu is not None
    reset = reset_mask.contiguous().view(torch.int8) if reset_mask is not None else None
    dev = q.device
    prec = dot_precision(q.dtype, settings.dot)
    cfg = kernel_config(K, V, prec, settings)
    BK, BV = cfg["BK"], cfg["BV_seq"]
    gamma = torch.empty(B, T, HV, device=dev, dtype=torch.float32)
    # Tg stays fp32: stored as bf16 by the one-warp inverse kernel it took 2.4x as long (H100, 2026-11-22).
    tt = torch.empty(2, nc, HV, CHUNK, CHUNK, device=dev, dtype=torch.float32)
    p = torch.empty(nc, HV, CHUNK, CHUNK, device=dev, dtype=operand_dtype(prec))
    dummy = gamma
    reset_arg = reset if reset is not None else dummy
    tables = (ctok0 if varlen else dummy, clen if varlen else dummy)
    _prepare_kernel[(nc, HV)](
        q, k, g, beta, reset_arg, *tables, gamma, tt[0], p, T, scale, H=H, HV=HV, K=K, BK=BK, BT=CHUNK,
        IS_VARLEN=varlen, HAS_RESET=reset is not None, L2NORM=use_l2norm, PREC=prec, **cfg["prep"])
    _inverse_kernel[(nc, HV)](tt[0], tt[1], gamma, reset_arg, *tables, T, HV=HV, BT=CHUNK, IS_VARLEN=varlen,
                              HAS_RESET=reset is not None, num_warps=1, num_stages=1)
    o = torch.empty(B, T, HV, V, device=dev, dtype=q.dtype)
    final_state = torch.empty(N, HV, K, V, device=dev, dtype=torch.float32)
    op_dtype = operand_dtype(prec)
    states = torch.empty((nc, HV, K, V) if save_states else (0,), device=dev, dtype=op_dtype)
    vn = torch.empty((B, T, HV, V) if save_states else (0,), device=dev, dtype=op_dtype)
    h0 = initial_state.contiguous() if initial_state is not None else None
    _fwd_kernel[(triton.cdiv(V, BV), N, HV)](
        q, k, v, gamma, beta, reset_arg, tt[1], p, h0 if h0 is not None else dummy, o,
        final_state, states, vn, cu if varlen else dummy, coff if varlen else dummy, T, scale,
        H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, BT=CHUNK, IS_VARLEN=varlen, HAS_RESET=reset is not None,
        HAS_H0=h0 is not None, SAVE_H=save_states, L2NORM=use_l2norm, PREC=prec, TPREC=inverse_precision(prec),
        **cfg["seq"])
    return o, final_state, gamma, tt, p, states, vn
