"""Triton kernels for the chunked SSD forward (see ``reference.py`` for the math), and the shared helpers of the
backward (``chunk_bwd.py``).

Kernel notation: q = C, k = B (a group's [BT, N] rows), v = dt x (a head's [BT, P] rows, scaled on load),
g = dt A, gamma = chunk-local cumsum of g, and the chunk factors of ``gated_delta_rule/chunk_common.gates``
(a_i = exp(gamma_i), b_i = exp(gamma_last - gamma_i), a_last, Gamma = exp(gamma_i - gamma_j) masked to causal
pairs of one document). Per chunk, with S the state entering it ([N, P], fp32):

    Y = diag(a) Q S + ((Q K^T) * Gamma) V + D x,          S' = a_last S + K^T diag(b) V

  _states_kernel  sequential over the chunks of one (sequence, head, N tile, P tile): S in registers; stores
                  the state entering every chunk (in the dot operand dtype) and the final state (fp32).
  _output_kernel  parallel over (chunk, head): Y from the stored states.
States are stored [chunk, H, N, P]; the public initial/final states are [row, H, P, N] (transformers' layout),
read and written transposed. Document boundaries and the packed-row bookkeeping are the GDN kernels'
(``chunk_tables``), so fixed-length batches and cu_seqlens share the kernels.
"""

from __future__ import annotations

import torch

from ..gated_delta_rule.chunk_common import (
    CHUNK,
    as_operand,
    chunk_coords,
    chunk_tables,
    gates,
    load_rows,
    mm,
    operand_dtype,
    seq_coords,
    store_rows,
)
from ..gated_delta_rule.chunk_common import dot_precision as gdr_dot_precision
from ..triton_runtime import interpreting, tl, triton


@triton.jit
def _state_tile(ptr, base, N, P, k0, v0, BK: tl.constexpr, BV: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Block pointer to the [BK, BV] tile at (k0, v0) of an [N, P] state: stored [N, P], or [P, N] (the public
    layout) when TRANSPOSED."""
    if TRANSPOSED:
        return tl.make_block_ptr(ptr + base, (N, P), (1, N), (k0, v0), (BK, BV), (0, 1))
    return tl.make_block_ptr(ptr + base, (N, P), (P, 1), (k0, v0), (BK, BV), (1, 0))


@triton.jit
def _load_state_tile(ptr, base, N, P, k0, v0, BK: tl.constexpr, BV: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The tile in the buffer's own dtype (the per-chunk buffers hold dot operands: no fp32 copy in registers)."""
    bp = _state_tile(ptr, base, N, P, k0, v0, BK, BV, TRANSPOSED)
    return tl.load(bp, boundary_check=(0, 1), padding_option="zero")


@triton.jit
def _store_state_tile(ptr, base, x, N, P, k0, v0, BK: tl.constexpr, BV: tl.constexpr, TRANSPOSED: tl.constexpr):
    bp = _state_tile(ptr, base, N, P, k0, v0, BK, BV, TRANSPOSED)
    tl.store(bp, x.to(ptr.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _chunk_dt(dt_ptr, tok0, L, h, H: tl.constexpr, BT: tl.constexpr):
    """dt [BT] of head h for the chunk's tokens (0 past its end)."""
    o_t = tl.arange(0, BT)
    return tl.load(dt_ptr + (tok0 + o_t).to(tl.int64) * H + h, mask=o_t < L, other=0.0).to(tl.float32)


@triton.jit
def _load_v(x_ptr, dt, tok0, L, h, v0, H: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """(x, v = dt x) tiles [BT, BV] of head h, columns v0.. (fp32)."""
    x = load_rows(x_ptr + h * P, tok0, L, H * P, v0, P, BT, BV)
    return x, x * dt[:, None]


@triton.jit
def _states_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, reset_ptr, h0_ptr, states_ptr, ht_ptr, cu, coff, T,
                   H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, P: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_RESET: tl.constexpr,
                   HAS_H0: tl.constexpr, PREC: tl.constexpr):
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
    if HAS_H0:
        s = _load_state_tile(h0_ptr, row_base, N, P, k0, v0, BK, BV, True).to(tl.float32)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
    A = tl.load(a_ptr + h).to(tl.float32)
    for j in range(0, n_chunks):
        tok0 = bos + j * BT
        L = tl.minimum(BT, eos - tok0)
        c = (c0 + j).to(tl.int64)
        _store_state_tile(states_ptr, (c * H + h) * N * P, s, N, P, k0, v0, BK, BV, False)
        dt = _chunk_dt(dt_ptr, tok0, L, h, H, BT)
        a, b, a_last, _, _ = gates(tl.cumsum(dt * A, 0), reset_ptr, tok0, L, BT, HAS_RESET, False)
        k = load_rows(b_ptr + grp * N, tok0, L, G * N, k0, N, BT, BK)
        _, v = _load_v(x_ptr, dt, tok0, L, h, v0, H, P, BT, BV)
        s = a_last * s + mm(tl.trans(as_operand(k * b[:, None], PREC)), as_operand(v, PREC), PREC)
    _store_state_tile(ht_ptr, row_base, s, N, P, k0, v0, BK, BV, True)


@triton.jit
def _output_kernel(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, reset_ptr, states_ptr, y_ptr, chunk_tok0, chunk_len,
                   T, H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, P: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_RESET: tl.constexpr,
                   HAS_D: tl.constexpr, PREC: tl.constexpr):
    c = tl.program_id(0)
    h = tl.program_id(1)
    grp = h // (H // G)
    tok0, L = chunk_coords(c, chunk_tok0, chunk_len, T, BT, IS_VARLEN)
    if L <= 0:
        return
    c = c.to(tl.int64)
    dt = _chunk_dt(dt_ptr, tok0, L, h, H, BT)
    A = tl.load(a_ptr + h).to(tl.float32)
    a, _, _, decay, _ = gates(tl.cumsum(dt * A, 0), reset_ptr, tok0, L, BT, HAS_RESET, True)
    q = as_operand(load_rows(c_ptr + grp * N, tok0, L, G * N, 0, N, BT, BK), PREC)
    k = as_operand(load_rows(b_ptr + grp * N, tok0, L, G * N, 0, N, BT, BK), PREC)
    pm = as_operand(mm(q, tl.trans(k), PREC) * decay, PREC)
    if HAS_D:
        d = tl.load(d_ptr + h).to(tl.float32)
    for v0 in range(0, P, BV):
        s = as_operand(_load_state_tile(states_ptr, (c * H + h) * N * P, N, P, 0, v0, BK, BV, False), PREC)
        x, v = _load_v(x_ptr, dt, tok0, L, h, v0, H, P, BT, BV)
        y = a[:, None] * mm(q, s, PREC) + mm(pm, as_operand(v, PREC), PREC)
        if HAS_D:
            y += d * x
        store_rows(y_ptr + h * P, y, tok0, L, H * P, v0, P, BT, BV)


# ------------------------------------------------------------------------------------------------------------
# Launchers. Tensors are time-major [B, T, heads, dim] and viewed as one packed row of B*T tokens.


# Warps per kernel group: at 4 warps every kernel used all 255 registers and spilled (ptxas, sm_90a, bf16
# operands, N = 128, P = 64); at 8 the sequential and output kernels have no spills.
WARPS = dict(seq=8, out=8, bwd=8)


def dot_precision(dot: str, *tensors: torch.Tensor) -> str:
    """The GDN kernels' dot-operand rule (``chunk_common.dot_precision``) for the widest of the inputs' dtypes:
    exact fp32 dots when every input is fp32, else ``dot`` (``KernelSettings.dot``; the SSD kernels implement
    "bf16", bf16 operands with fp32 accumulation)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return gdr_dot_precision(dtype, dot)


def tiles(N: int, P: int) -> dict:
    """Tile sizes: the parallel kernels hold all N state columns (BK_full), the sequential kernels tile N and P
    by 64 for parallelism over the heads' state. On the GPU tiles are at least 64 wide (the shapes the GDN
    kernels were validated with on Triton 3.6); the interpreter takes 16 for speed."""
    lo = 16 if interpreting() else 64
    bk_full = max(lo, triton.next_power_of_2(N))
    bv = max(lo, min(64, triton.next_power_of_2(P)))
    return dict(BK_full=bk_full, BK_seq=min(bk_full, 64), BV=bv)


def prepare(x, dt, A, B, C, D, cu_seqlens, reset_mask):
    """Contiguous inputs, fp32 per-head parameters, the chunk tables and the reset mask as int8."""
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    A = A.float().contiguous()
    D = D.float().contiguous() if D is not None else None
    tables = chunk_tables(cu_seqlens, x.shape[0], x.shape[1])
    reset = reset_mask.contiguous().view(torch.int8) if reset_mask is not None else None
    return x, dt, A, B, C, D, tables, reset


def chunk_ssd_fwd(x, dt, A, B, C, D, initial_state, cu_seqlens, reset_mask, dot="bf16"):
    """Forward pass. Returns (y, final_state [rows, H, P, N] fp32, states [chunks, H, N, P] in the dot operand
    dtype: the state entering every chunk, read by the output kernel and by the backward)."""
    Bsz, T, H, P = x.shape
    G, N = B.shape[2:]
    rows = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    x, dt, A, B, C, D, (cu, coff, ctok0, clen, nc), reset = prepare(x, dt, A, B, C, D, cu_seqlens, reset_mask)
    varlen = cu is not None
    prec = dot_precision(dot, x, B, C)
    t = tiles(N, P)
    dev = x.device
    states = torch.empty(nc, H, N, P, device=dev, dtype=operand_dtype(prec))
    final_state = torch.empty(rows, H, P, N, device=dev, dtype=torch.float32)
    dummy = A
    h0 = initial_state.contiguous() if initial_state is not None else None
    flags = dict(IS_VARLEN=varlen, HAS_RESET=reset is not None, PREC=prec)
    reset_arg = reset if reset is not None else dummy
    _states_kernel[(triton.cdiv(N, t["BK_seq"]), triton.cdiv(P, t["BV"]), rows * H)](
        x, dt, A, B, reset_arg, h0 if h0 is not None else dummy, states, final_state,
        cu if varlen else dummy, coff if varlen else dummy, T, H=H, G=G, N=N, P=P, BK=t["BK_seq"], BV=t["BV"],
        BT=CHUNK, HAS_H0=h0 is not None, num_warps=WARPS["seq"], num_stages=1, **flags)
    y = torch.empty_like(x)
    _output_kernel[(nc, H)](
        x, dt, A, B, C, D if D is not None else dummy, reset_arg, states, y, ctok0 if varlen else dummy,
        clen if varlen else dummy, T, H=H, G=G, N=N, P=P, BK=t["BK_full"], BV=t["BV"], BT=CHUNK,
        HAS_D=D is not None, num_warps=WARPS["out"], num_stages=1, **flags)
    return y, final_state, states
