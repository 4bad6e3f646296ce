"""Triton kernels for the chunked gated delta rule (training / prefill): forward, shared helpers, launchers.

Per value head, with the state S [K, V] entering a chunk of C = 64 tokens (positions i, j in the chunk),
gamma = chunk-local cumsum of g, and Gamma[i, j] = exp(gamma_i - gamma_j) for j <= i in the same document:

    T0  = (I + strict_tril(diag(beta) K K^T))^-1           (gate-free: does not depend on g)
    Tg  = T0 * Gamma                                       (the gated inverse, elementwise)
    X   = diag(beta) (V - diag(a) K S)                      a_i = exp(gamma_i)
    Vn  = Tg X                                              (the per-token deltas; never stored)
    O   = diag(a) Q S + ((Q K^T) * Gamma) Vn
    S'  = a_C S + K^T diag(b) Vn                            b_i = exp(gamma_C - gamma_i), a_C = exp(gamma_C)

(q carries the scale.) The gated inverse equals the ungated one times the decay mask because the decay is a
diagonal similarity: (I + D A D^-1)^-1 = D (I + A)^-1 D^-1. Document resets (``reset_mask``) zero the mask
entries that cross a reset, and a_i / b_i / a_C for tokens that cannot see the entering state / reach the end.

Forward kernels (one launch each; the backward ones are in ``gdn_chunk_bwd.py``):
  _prepare_kernel  parallel over (chunk, head): gamma (fp32), A0 = strict_tril(diag(beta) K K^T) and
                   P = (Q K^T) * Gamma, the output operand of the sequential kernels.
  _inverse_kernel  parallel over (chunk, head), one warp: T0 = (I + A0)^-1 by 16x16 blocks (in place of A0)
                   and Tg = T0 * Gamma.
  _fwd_kernel      sequential over the chunks of one (sequence, head, V tile): S in registers (fp32), writes O
                   and, for training, the state entering each chunk and Vn (both in the dot operand dtype), which
                   the backward reads instead of recomputing them. W and U are never stored.
Exponents are always differences gamma_i - gamma_j with i >= j (<= 0), so nothing overflows for g <= 0.

Dot precision (``_dot_precision``): fp32 inputs use exact fp32 dots. bf16/fp16 inputs use bf16 operands with fp32
accumulation, except the products with the inverses Tg and T0, which stay tf32 on fp32 operands
(``_inverse_precision``); ``OLMO_HYBRID_GDN_DOT=tf32`` makes every product tf32 (two thirds
of the error at 1.6x the time on an H100; docs/benchmarks.md).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._interpret import interpreting

CHUNK = 64


@triton.jit
def _rows_block(ptr, tok0, L, stride_t, col0, NCOL, BT: tl.constexpr, BD: tl.constexpr):
    """Block pointer to rows tok0..tok0+L (row stride stride_t) and columns col0.. of a head.

    Block pointers keep the [BT, BD] address and mask tiles out of registers (plain pointer tiles are 64-bit
    per element and made the sequential kernels spill)."""
    return tl.make_block_ptr(ptr + tok0.to(tl.int64) * stride_t, (L, NCOL), (stride_t, 1), (0, col0), (BT, BD),
                             (1, 0))


@triton.jit
def _load_rows(ptr, tok0, L, stride_t, col0, NCOL, BT: tl.constexpr, BD: tl.constexpr):
    """fp32 tile [BT, BD] of rows tok0.. and columns col0.. of a head; zeros outside."""
    bp = _rows_block(ptr, tok0, L, stride_t, col0, NCOL, BT, BD)
    return tl.load(bp, boundary_check=(0, 1), padding_option="zero").to(tl.float32)


@triton.jit
def _store_rows(ptr, x, tok0, L, stride_t, col0, NCOL, BT: tl.constexpr, BD: tl.constexpr):
    bp = _rows_block(ptr, tok0, L, stride_t, col0, NCOL, BT, BD)
    tl.store(bp, x.to(ptr.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation; PREC "bf16" rounds both operands to bfloat16 (2x the tensor-core rate of
    tf32), otherwise it is tl.dot's input_precision ("tf32" or "ieee")."""
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PREC == "bf16emu":  # the same numbers in fp32: Triton 3.6's interpreter miscomputes bf16 dots
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
    elif PREC == "tf32r":  # Triton 3.6 feeds fp32 to tf32 wgmma unrounded (truncated): round to nearest first
        return tl.dot(_round_tf32(a), _round_tf32(b), input_precision="tf32")
    elif PREC == "tf32emu":  # the interpreter ignores input_precision; round operands to tf32 (10-bit mantissa)
        return tl.dot(_round_tf32(a), _round_tf32(b), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _round_tf32(x):
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _op(x, PREC: tl.constexpr):
    """x as a dot operand: rounded to bfloat16 once (instead of at every use) in the "bf16" mode."""
    if PREC == "bf16":
        return x.to(tl.bfloat16)
    elif PREC == "bf16emu":
        return x.to(tl.bfloat16).to(tl.float32)
    else:
        return x




@triton.jit
def _state_block(ptr, base, K, V, v0, BK: tl.constexpr, BV: tl.constexpr):
    """Block pointer to the [BK, BV] tile at columns v0.. of the [K, V] fp32 matrix at ptr + base."""
    return tl.make_block_ptr(ptr + base, (K, V), (V, 1), (0, v0), (BK, BV), (1, 0))


@triton.jit
def _load_state(ptr, base, K, V, v0, BK: tl.constexpr, BV: tl.constexpr):
    bp = _state_block(ptr, base, K, V, v0, BK, BV)
    return tl.load(bp, boundary_check=(0, 1), padding_option="zero").to(tl.float32)


@triton.jit
def _store_state(ptr, base, x, K, V, v0, BK: tl.constexpr, BV: tl.constexpr):
    tl.store(_state_block(ptr, base, K, V, v0, BK, BV), x.to(ptr.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _gates(gam, reset_ptr, tok0, L, BT: tl.constexpr, HAS_RESET: tl.constexpr, MATRIX: tl.constexpr):
    """Decay factors of one chunk from its gamma [BT]: a [BT], b [BT], a_C (scalar) and, if MATRIX, the mask of
    connected pairs (j <= i, same document) and Gamma [BT, BT] (zero where not connected)."""
    o_t = tl.arange(0, BT)
    valid = o_t < L
    is_last = o_t == L - 1
    gam_last = tl.sum(tl.where(is_last, gam, 0.0), 0)
    if HAS_RESET:
        r = tl.load(reset_ptr + tok0 + o_t, mask=valid, other=0).to(tl.int32)
        seg = tl.cumsum(r, 0)
        seg_last = tl.sum(tl.where(is_last, seg, 0), 0)
        a = tl.where(valid & (seg == 0), tl.exp(gam), 0.0)
        b = tl.where(valid & (seg == seg_last), tl.exp(gam_last - gam), 0.0)
        a_last = tl.where(seg_last == 0, tl.exp(gam_last), 0.0)
    else:
        seg = o_t * 0
        a = tl.where(valid, tl.exp(gam), 0.0)
        b = tl.where(valid, tl.exp(gam_last - gam), 0.0)
        a_last = tl.exp(gam_last)
    if MATRIX:
        causal = (o_t[:, None] >= o_t[None, :]) & valid[:, None] & valid[None, :] & (seg[:, None] == seg[None, :])
        decay = tl.exp(tl.where(causal, gam[:, None] - gam[None, :], float("-inf")))
    else:
        causal = valid
        decay = a
    return a, b, a_last, decay, causal


@triton.jit
def _load_gamma(gamma_ptr, tok0, L, hv, HV: tl.constexpr, BT: tl.constexpr):
    o_t = tl.arange(0, BT)
    return tl.load(gamma_ptr + (tok0 + o_t).to(tl.int64) * HV + hv, mask=o_t < L, other=0.0)


@triton.jit
def _chunk_coords(c, chunk_tok0, chunk_len, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """First token and length of global chunk c (length 0 for the padding chunks of a packed batch)."""
    if IS_VARLEN:
        tok0 = tl.load(chunk_tok0 + c)
        L = tl.load(chunk_len + c)
    else:
        NT = tl.cdiv(T, BT)
        n = c // NT
        j = c % NT
        tok0 = n * T + j * BT
        L = tl.minimum(BT, T - j * BT)
    return tok0, L


@triton.jit
def _seq_coords(n, cu, coff, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token, end token, first global chunk) of sequence n."""
    if IS_VARLEN:
        bos = tl.load(cu + n)
        eos = tl.load(cu + n + 1)
        c0 = tl.load(coff + n)
    else:
        bos = n * T
        eos = bos + T
        c0 = n * tl.cdiv(T, BT)
    return bos, eos, c0


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
    tok0, L = _chunk_coords(c, chunk_tok0, chunk_len, T, BT, IS_VARLEN)
    if L <= 0:
        return
    o_t = tl.arange(0, BT)
    valid = o_t < L
    g = tl.load(g_ptr + (tok0 + o_t).to(tl.int64) * HV + hv, mask=valid, other=0.0).to(tl.float32)
    gam = tl.cumsum(g, 0)
    tl.store(gamma_ptr + (tok0 + o_t).to(tl.int64) * HV + hv, gam, mask=valid)
    beta = tl.load(beta_ptr + (tok0 + o_t).to(tl.int64) * HV + hv, mask=valid, other=0.0).to(tl.float32)
    a, b, a_last, decay, causal = _gates(gam, reset_ptr, tok0, L, BT, HAS_RESET, True)
    q, k = _load_qk(q_ptr, k_ptr, tok0, L, hv // (HV // H), scale, H, K, BT, BK, L2NORM, PREC)
    tile = (c.to(tl.int64) * HV + hv) * BT * BT + o_t[:, None] * BT + o_t[None, :]
    kk = _mm(k, tl.trans(k), PREC)
    tl.store(a_ptr + tile, tl.where(causal & (o_t[:, None] > o_t[None, :]), beta[:, None] * kk, 0.0))
    tl.store(p_ptr + tile, (_mm(q, tl.trans(k), PREC) * decay).to(p_ptr.dtype.element_ty))


@triton.jit
def _inverse_kernel(a_ptr, tg_ptr, gamma_ptr, reset_ptr, chunk_tok0, chunk_len, T, HV: tl.constexpr,
                    BT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_RESET: tl.constexpr):
    """T0 = (I + A0)^-1 by 16x16 blocks (in place of A0) and Tg = T0 * Gamma. Meant for one warp: the row
    substitutions reduce over 16x16 tiles, which across several warps costs a barrier per step."""
    c = tl.program_id(0)
    hv = tl.program_id(1)
    tok0, L = _chunk_coords(c, chunk_tok0, chunk_len, T, BT, IS_VARLEN)
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
def _load_normed(x_ptr, tok0, L, h, scale, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                 L2NORM: tl.constexpr):
    """(x_hat * scale, r): the rows of q or k, l2-normalised if L2NORM (r = 1 / |x|, else 1), in fp32."""
    x = _load_rows(x_ptr + h * K, tok0, L, H * K, 0, K, BT, BK)
    if L2NORM:
        r = tl.rsqrt(tl.sum(x * x, 1) + 1e-6)
    else:
        r = tl.full([BT], 1.0, tl.float32)
    return x * (r * scale)[:, None], r


@triton.jit
def _load_qk(q_ptr, k_ptr, tok0, L, h, scale, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
             BK: tl.constexpr, L2NORM: tl.constexpr, PREC: tl.constexpr):
    """q (normalised, scaled) and k (normalised) of a chunk, as dot operands."""
    q, _ = _load_normed(q_ptr, tok0, L, h, scale, H, K, BT, BK, L2NORM)
    k, _ = _load_normed(k_ptr, tok0, L, h, 1.0, H, K, BT, BK, L2NORM)
    return _op(q, PREC), _op(k, PREC)


@triton.jit
def _load_cc(t0_ptr, c, hv, HV: tl.constexpr, BT: tl.constexpr):
    """The [BT, BT] matrix of chunk c, head hv from a per-chunk buffer (T0, Tg or P)."""
    bp = tl.make_block_ptr(t0_ptr + (c * HV + hv) * BT * BT, (BT, BT), (BT, 1), (0, 0), (BT, BT), (1, 0))
    return tl.load(bp).to(tl.float32)


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
    bos, eos, c0 = _seq_coords(n, cu, coff, T, BT, IS_VARLEN)
    n_chunks = tl.cdiv(eos - bos, BT)
    if HAS_H0:
        s = _load_state(h0_ptr, (n * HV + hv).to(tl.int64) * K * V, K, V, v0, BK, BV)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
    bh = beta_ptr + hv
    for j in range(0, n_chunks):
        tok0 = bos + j * BT
        L = tl.minimum(BT, eos - tok0)
        c = (c0 + j).to(tl.int64)
        if SAVE_H:
            _store_state(hbuf_ptr, (c * HV + hv) * K * V, s, K, V, v0, BK, BV)
        q, k = _load_qk(q_ptr, k_ptr, tok0, L, h, scale, H, K, BT, BK, L2NORM, PREC)
        s_op = _op(s, PREC)
        o_t = tl.arange(0, BT)
        beta = tl.load(bh + (tok0 + o_t).to(tl.int64) * HV, mask=o_t < L, other=0.0).to(tl.float32)
        gam = _load_gamma(gamma_ptr, tok0, L, hv, HV, BT)
        a, b, a_last, _, _ = _gates(gam, reset_ptr, tok0, L, BT, HAS_RESET, False)
        v = _load_rows(v_ptr + hv * V, tok0, L, HV * V, v0, V, BT, BV)
        x = beta[:, None] * (v - a[:, None] * _mm(k, s_op, PREC))
        vn = _op(_mm(_load_cc(tg_ptr, c, hv, HV, BT), x, TPREC), PREC)
        o = a[:, None] * _mm(q, s_op, PREC) + _mm(_load_cc(p_ptr, c, hv, HV, BT), vn, PREC)
        _store_rows(o_ptr + hv * V, o, tok0, L, HV * V, v0, V, BT, BV)
        if SAVE_H:
            _store_rows(vn_ptr + hv * V, vn, tok0, L, HV * V, v0, V, BT, BV)
        s = a_last * s + _mm(tl.trans(_op(k * b[:, None], PREC)), vn, PREC)
    _store_state(ht_ptr, (n * HV + hv).to(tl.int64) * K * V, s, K, V, v0, BK, BV)


# ------------------------------------------------------------------------------------------------------------
# Launchers. Tensors are [B, T, heads, dim] (time-major, as the public op); everything is viewed as one packed
# row of B*T tokens, so fixed-length batches and cu_seqlens share the kernels.


def _dot_precision(dtype: torch.dtype, group: str = "FWD") -> str:
    """Dot operand precision: exact fp32 for fp32 inputs; for 16-bit inputs bf16 operands with fp32 accumulation
    (fla's choice; 1.6x the speed of tf32 on an H100), or tf32 with ``OLMO_HYBRID_GDN_DOT=tf32`` (two thirds
    of the error, see docs/benchmarks.md). ``OLMO_HYBRID_GDN_DOT_FWD`` / ``_BWD`` set the forward or backward kernels
    alone. In the interpreter the "emu" variants round operands explicitly (it ignores input_precision)."""
    if dtype in (torch.float32, torch.float64):
        return "ieee"
    var = f"OLMO_HYBRID_GDN_DOT_{group}"
    var = var if var in os.environ else "OLMO_HYBRID_GDN_DOT"
    prec = os.environ.get(var, "bf16")
    if prec not in ("bf16", "tf32", "tf32r"):
        raise ValueError(f"{var}={prec!r}: expected bf16, tf32 or tf32r")
    if interpreting():
        return prec[:4] + "emu"
    return prec


def _inverse_precision(prec: str) -> str:
    """Dot precision of the products with the UT inverses (Tg, T0): tf32 (fp32 operands) under bf16 operands
    elsewhere. The inverse's entries grow with beta and with barely gated keys, so rounding them (and their
    partners) to bf16 cost 3-10x the error of the bf16 rounding of the other operands in the interpreter tests."""
    return {"bf16": "tf32", "bf16emu": "tf32emu"}.get(prec, prec)


def _operand_dtype(prec: str) -> torch.dtype:
    return torch.bfloat16 if prec.startswith("bf16") else torch.float32


def _config(K: int, V: int, prec: str = "tf32") -> dict:
    """Block sizes and launch settings, from ptxas shared-memory/spill reports and H100 runs
    (docs/benchmarks.md). ``OLMO_HYBRID_GDN_BV`` / ``OLMO_HYBRID_GDN_WARPS`` override the sequential kernels'
    V tile and warps, ``OLMO_HYBRID_GDN_BWD_WARPS`` the parallel backward kernel's warps, for tuning runs."""
    # K tiles of at least 64 (zero columns loaded for smaller heads, never stored): the tile shapes the GPU tests
    # passed with (2026-11-22); K tiles of 16/32 have not been run on a GPU with the 4-warp backward below.
    BK = max(64, triton.next_power_of_2(K))
    # bf16 operands: V tiles of 64 in the sequential kernels. At 32 the forward kernel's output was wrong (0.87
    # relative error at K=V=128, H100, Triton 3.6, 2026-11-22); at 64 it is right and 2.5x faster than tf32.
    bv_default = 64 if prec.startswith("bf16") else (32 if BK <= 128 else 16)
    BV_seq = max(16, min(int(os.environ.get("OLMO_HYBRID_GDN_BV", bv_default)), triton.next_power_of_2(V)))
    # The parallel backward kernels run 4 warps; with bf16 operands V tiles of 64 (the fastest setting of the H100
    # sweep, benchmarks/sweep_gdn.py: 6.0 ms fwd+bwd at B=8 T=4096 H=16 d=128, against 7.0 at 8 warps). tf32
    # operands: V tiles of 16 (larger ones pushed the old fused kernel past the 227 KB of shared memory); at 8
    # warps its dq/dk/dg were wrong in the small-head GPU tests (2026-11-22), likely because Triton 3.6 then emits
    # tf32 wgmma of N = 8 with unpadded operands (triton-lang/triton#10629).
    bf16 = prec.startswith("bf16")
    BV_bwd = int(os.environ.get("OLMO_HYBRID_GDN_BWD_BV", 64 if bf16 else 16))
    BV_bwd = min(BV_bwd, max(16, triton.next_power_of_2(V)))
    warps = int(os.environ.get("OLMO_HYBRID_GDN_WARPS", "4"))
    bwd_warps = int(os.environ.get("OLMO_HYBRID_GDN_BWD_WARPS", "4"))
    stages = int(os.environ.get("OLMO_HYBRID_GDN_STAGES", "1"))
    bwd_stages = int(os.environ.get("OLMO_HYBRID_GDN_BWD_STAGES", "1"))
    return dict(BK=BK, BV_seq=BV_seq, BV_bwd=BV_bwd, seq=dict(num_warps=warps, num_stages=stages),
                bwd=dict(num_warps=bwd_warps, num_stages=bwd_stages), prep=dict(num_warps=4, num_stages=1))


def chunk_tables(cu_seqlens: torch.Tensor | None, B: int, T: int):
    """Chunk bookkeeping: (cu, coff, chunk_tok0, chunk_len, n_chunks_max) for packed rows, or Nones.

    Computed with device ops only (no host sync): the grid is sized by an upper bound on the chunk count,
    T // 64 + N, and surplus chunks get length 0."""
    if cu_seqlens is None:
        return None, None, None, None, B * triton.cdiv(T, CHUNK)
    cu = cu_seqlens.to(torch.int32)
    N = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    nch = (lens + CHUNK - 1) // CHUNK
    cum = torch.cumsum(nch, 0).to(torch.int32)
    coff = (cum - nch).to(torch.int32)
    nc_max = T // CHUNK + N
    c = torch.arange(nc_max, device=cu.device, dtype=torch.int32)
    seq = torch.searchsorted(cum, c, right=True).clamp_(max=N - 1)
    tok0 = cu[seq] + (c - coff[seq]) * CHUNK
    length = torch.where(c < cum[-1], (cu[seq + 1] - tok0).clamp(0, CHUNK), 0).to(torch.int32)
    return cu.contiguous(), coff.contiguous(), tok0.to(torch.int32).contiguous(), length.contiguous(), nc_max


def chunk_gdr_fwd(q, k, v, g, beta, scale, initial_state, cu_seqlens, reset_mask, use_l2norm, save_states):
    """Forward pass. Returns (o, final_state, gamma, tt, p, states, vn): gamma the chunk-local cumsum of g, tt the
    stacked [T0, Tg] (gate-free and gated inverses, fp32), p the output operand P; states (per-chunk entering
    states) and vn (the per-token deltas Vn, [B, T, HV, V]) are empty unless save_states. p, states and vn are kept
    in the dot operand dtype (``_operand_dtype``): the backward only reads them as dot operands."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    cu, coff, ctok0, clen, nc = chunk_tables(cu_seqlens, B, T)
    varlen = cu is not None
    reset = reset_mask.contiguous().view(torch.int8) if reset_mask is not None else None
    dev = q.device
    prec = _dot_precision(q.dtype)
    cfg = _config(K, V, prec)
    BK, BV = cfg["BK"], cfg["BV_seq"]
    gamma = torch.empty(B, T, HV, device=dev, dtype=torch.float32)
    # Tg stays fp32: stored as bf16 by the one-warp inverse kernel it took 2.4x as long (H100, 2026-11-22).
    tt = torch.empty(2, nc, HV, CHUNK, CHUNK, device=dev, dtype=torch.float32)
    p = torch.empty(nc, HV, CHUNK, CHUNK, device=dev, dtype=_operand_dtype(prec))
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
    op_dtype = _operand_dtype(prec)
    states = torch.empty((nc, HV, K, V) if save_states else (0,), device=dev, dtype=op_dtype)
    vn = torch.empty((B, T, HV, V) if save_states else (0,), device=dev, dtype=op_dtype)
    h0 = initial_state.contiguous() if initial_state is not None else None
    _fwd_kernel[(triton.cdiv(V, BV), N, HV)](
        q, k, v, gamma, beta, reset_arg, tt[1], p, h0 if h0 is not None else dummy, o,
        final_state, states, vn, cu if varlen else dummy, coff if varlen else dummy, T, scale,
        H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, BT=CHUNK, IS_VARLEN=varlen, HAS_RESET=reset is not None,
        HAS_H0=h0 is not None, SAVE_H=save_states, L2NORM=use_l2norm, PREC=prec, TPREC=_inverse_precision(prec),
        **cfg["seq"])
    return o, final_state, gamma, tt, p, states, vn
