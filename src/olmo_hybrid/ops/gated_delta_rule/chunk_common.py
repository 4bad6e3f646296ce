"""Triton helpers shared by the chunked gated-delta-rule kernels of ``chunk_fwd.py`` and ``chunk_bwd.py``:
tile loads and stores, dot products at the chosen precision, the per-chunk decay factors, chunk bookkeeping and
the launch configuration. The algorithm and its notation are described in ``chunk_fwd.py``.

Dot precision (``dot_precision``): fp32 inputs use exact fp32 dots. bf16/fp16 inputs use bf16 operands with fp32
accumulation, except the products with the inverses Tg and T0, which stay tf32 on fp32 operands
(``inverse_precision``); ``KernelSettings(dot="tf32")`` makes every product tf32.
"""

from __future__ import annotations

import torch

from olmo_hybrid.config import KernelSettings
from ..triton_runtime import interpreting, tl, triton

CHUNK = 64


@triton.jit
def _rows_block(ptr, tok0, L, stride_t, col0, NCOL, BT: tl.constexpr, BD: tl.constexpr):
    """Block pointer to rows tok0..tok0+L (row stride stride_t) and columns col0.. of a head.

    Block pointers keep the [BT, BD] address and mask tiles out of registers (plain pointer tiles are 64-bit
    per element and made the sequential kernels spill)."""
    return tl.make_block_ptr(ptr + tok0.to(tl.int64) * stride_t, (L, NCOL), (stride_t, 1), (0, col0), (BT, BD),
                             (1, 0))


@triton.jit
def load_rows(ptr, tok0, L, stride_t, col0, NCOL, BT: tl.constexpr, BD: tl.constexpr):
    """fp32 tile [BT, BD] of rows tok0.. and columns col0.. of a head; zeros outside."""
    bp = _rows_block(ptr, tok0, L, stride_t, col0, NCOL, BT, BD)
    return tl.load(bp, boundary_check=(0, 1), padding_option="zero").to(tl.float32)


@triton.jit
def store_rows(ptr, x, tok0, L, stride_t, col0, NCOL, BT: tl.constexpr, BD: tl.constexpr):
    bp = _rows_block(ptr, tok0, L, stride_t, col0, NCOL, BT, BD)
    tl.store(bp, x.to(ptr.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation; PREC "bf16" rounds both operands to bfloat16 (2x the tensor-core rate of
    tf32), otherwise it is tl.dot's input_precision ("tf32" or "ieee")."""
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PREC == "bf16emu":  # the same numbers in fp32: Triton 3.6's interpreter miscomputes bf16 dots
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
    elif PREC == "tf32r":  # Triton 3.6 feeds fp32 to tf32 wgmma unrounded (truncated): round to nearest first
        return tl.dot(round_tf32(a), round_tf32(b), input_precision="tf32")
    elif PREC == "tf32emu":  # the interpreter ignores input_precision; round operands to tf32 (10-bit mantissa)
        return tl.dot(round_tf32(a), round_tf32(b), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def round_tf32(x):
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def as_operand(x, PREC: tl.constexpr):
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
def load_state(ptr, base, K, V, v0, BK: tl.constexpr, BV: tl.constexpr):
    bp = _state_block(ptr, base, K, V, v0, BK, BV)
    return tl.load(bp, boundary_check=(0, 1), padding_option="zero").to(tl.float32)


@triton.jit
def store_state(ptr, base, x, K, V, v0, BK: tl.constexpr, BV: tl.constexpr):
    tl.store(_state_block(ptr, base, K, V, v0, BK, BV), x.to(ptr.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def gates(gam, reset_ptr, tok0, L, BT: tl.constexpr, HAS_RESET: tl.constexpr, MATRIX: tl.constexpr):
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
def load_gamma(gamma_ptr, tok0, L, hv, HV: tl.constexpr, BT: tl.constexpr):
    o_t = tl.arange(0, BT)
    return tl.load(gamma_ptr + (tok0 + o_t).to(tl.int64) * HV + hv, mask=o_t < L, other=0.0)


@triton.jit
def chunk_coords(c, chunk_tok0, chunk_len, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
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
def seq_coords(n, cu, coff, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
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
def load_normed(x_ptr, tok0, L, h, scale, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                 L2NORM: tl.constexpr):
    """(x_hat * scale, r): the rows of q or k, l2-normalised if L2NORM (r = 1 / |x|, else 1), in fp32."""
    x = load_rows(x_ptr + h * K, tok0, L, H * K, 0, K, BT, BK)
    if L2NORM:
        r = tl.rsqrt(tl.sum(x * x, 1) + 1e-6)
    else:
        r = tl.full([BT], 1.0, tl.float32)
    return x * (r * scale)[:, None], r


@triton.jit
def load_qk(q_ptr, k_ptr, tok0, L, h, scale, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
             BK: tl.constexpr, L2NORM: tl.constexpr, PREC: tl.constexpr):
    """q (normalised, scaled) and k (normalised) of a chunk, as dot operands."""
    q, _ = load_normed(q_ptr, tok0, L, h, scale, H, K, BT, BK, L2NORM)
    k, _ = load_normed(k_ptr, tok0, L, h, 1.0, H, K, BT, BK, L2NORM)
    return as_operand(q, PREC), as_operand(k, PREC)


@triton.jit
def load_chunk_matrix(t0_ptr, c, hv, HV: tl.constexpr, BT: tl.constexpr):
    """The [BT, BT] matrix of chunk c, head hv from a per-chunk buffer (T0, Tg or P)."""
    bp = tl.make_block_ptr(t0_ptr + (c * HV + hv) * BT * BT, (BT, BT), (BT, 1), (0, 0), (BT, BT), (1, 0))
    return tl.load(bp).to(tl.float32)


def dot_precision(dtype: torch.dtype, dot: str) -> str:
    """The kernels' dot precision for inputs of ``dtype``: exact fp32 ("ieee") for fp32 inputs; for 16-bit inputs
    ``dot`` (``KernelSettings.dot`` or ``dot_backward``: "bf16" operands with fp32 accumulation, fla's choice and
    1.6x the speed of tf32 on an H100; "tf32", two thirds of the error; "tf32r"; docs/benchmarks_history.md). In the
    interpreter the "emu" variants round operands explicitly (it ignores input_precision)."""
    if dtype in (torch.float32, torch.float64):
        return "ieee"
    if interpreting():
        return dot[:4] + "emu"
    return dot


def inverse_precision(prec: str) -> str:
    """Dot precision of the products with the UT inverses (Tg, T0): tf32 (fp32 operands) under bf16 operands
    elsewhere. The inverse's entries grow with beta and with barely gated keys, so rounding them (and their
    partners) to bf16 cost 3-10x the error of the bf16 rounding of the other operands in the interpreter tests."""
    return {"bf16": "tf32", "bf16emu": "tf32emu"}.get(prec, prec)


def operand_dtype(prec: str) -> torch.dtype:
    """dtype of the buffers that the kernels only read as dot operands (P, the saved states, Vn, dVn)."""
    return torch.bfloat16 if prec.startswith("bf16") else torch.float32


def kernel_config(K: int, V: int, prec: str, settings: KernelSettings) -> dict:
    """Block sizes and launch settings for dot precision ``prec``: ``settings`` where it sets them, else the
    defaults chosen from ptxas shared-memory/spill reports and H100 runs (docs/benchmarks_history.md)."""
    # K tiles of at least 64 (zero columns loaded for smaller heads, never stored): the tile shapes the GPU tests
    # passed with (2026-11-22); K tiles of 16/32 have not been run on a GPU with the 4-warp backward below.
    BK = max(64, triton.next_power_of_2(K))
    # bf16 operands: V tiles of 64 in the sequential kernels. At 32 the forward kernel's output was wrong (0.87
    # relative error at K=V=128, H100, Triton 3.6, 2026-11-22); at 64 it is right and 2.5x faster than tf32.
    bf16 = prec.startswith("bf16")
    bv_seq = settings.block_v if settings.block_v is not None else (64 if bf16 else (32 if BK <= 128 else 16))
    BV_seq = max(16, min(bv_seq, triton.next_power_of_2(V)))
    # The parallel backward kernels run 4 warps; with bf16 operands V tiles of 64 (the fastest setting of the H100
    # sweep, benchmarks/sweep_gdn.py: 6.0 ms fwd+bwd at B=8 T=4096 H=16 d=128, against 7.0 at 8 warps). tf32
    # operands: V tiles of 16 (larger ones pushed the old fused kernel past the 227 KB of shared memory); at 8
    # warps its dq/dk/dg were wrong in the small-head GPU tests (2026-11-22), likely because Triton 3.6 then emits
    # tf32 wgmma of N = 8 with unpadded operands (triton-lang/triton#10629).
    bv_bwd = settings.backward_block_v if settings.backward_block_v is not None else (64 if bf16 else 16)
    BV_bwd = min(bv_bwd, max(16, triton.next_power_of_2(V)))
    return dict(BK=BK, BV_seq=BV_seq, BV_bwd=BV_bwd, seq=dict(num_warps=settings.warps, num_stages=settings.stages),
                bwd=dict(num_warps=settings.backward_warps, num_stages=settings.backward_stages),
                prep=dict(num_warps=4, num_stages=1))


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
