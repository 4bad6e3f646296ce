"""Split-KV attention for one query token per row over the slot cache, with per-row lengths on the device.

The engine's decode step needs attention of row ``b``'s new query over the first ``lengths[b]`` keys of its
cache row. SDPA does that with a mask over a fixed number of keys, which a CUDA graph must fix at capture:
one graph per span bucket, each step reading the whole bucket (up to half again the keys needed). Here the
lengths are read on the device, so one CUDA graph serves every context length and a step reads only the keys
it needs (programs past a row's length exit at once). Each (row, head) is split along the keys into
``n_splits`` programs (flash-decoding), so batch 1 fills the GPU, and a second small kernel merges the partial
softmaxes. On an H100 at 32k keys it ran 8% (batch 1) to 20% (batch 16) slower than SDPA's flash kernel over
exactly the keys needed (docs/benchmarks.md, "Generation"). The "triton" backend of
``olmo_hybrid.ops.decode_attention`` (``api.py`` checks the arguments); the launch settings are tunable here.

Bytes moved per call: the keys and values actually attended (2 * lengths * head_dim * 2 per kv head) plus
``n_splits * (head_dim + 2) * 4`` per (row, head) of partial results: the kernel is memory-bound.
"""

from __future__ import annotations

import math

import torch

from ..triton_runtime import tl, triton

_LOG2E = 1.4426950408889634
MAX_SPLITS = 64  # partial results per (row, head) the merge kernel holds at once


@triton.jit
def _partial_kernel(q_ptr, k_ptr, v_ptr, len_ptr, acc_ptr, ml_ptr, sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                    scale_log2, SPLIT, N_SPLITS, H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    length = tl.load(len_ptr + b).to(tl.int32)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, length)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    # torch.compile passes a Python float as fp64 (a direct launch as fp32): one fp32 value either way, so the
    # running max and sum keep one type and compiled and eager decode read the same scores.
    scale = tl.cast(scale_log2, tl.float32)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + d, mask=dmask, other=0.0).to(tl.float32) * scale
    k_row = k_ptr + b.to(tl.int64) * sk_b + hk * sk_h
    v_row = v_ptr + b.to(tl.int64) * sv_b + hk * sv_h
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        tile = nmask[:, None] & dmask[None, :]
        # Both tiles requested before either is used: twice the bytes in flight per program.
        k = tl.load(k_row + n[:, None].to(tl.int64) * sk_t + d[None, :], mask=tile, other=0.0)
        v = tl.load(v_row + n[:, None].to(tl.int64) * sv_t + d[None, :], mask=tile, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)  # scores in log2 units
        s = tl.where(nmask, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    part = bh * N_SPLITS + split
    tl.store(acc_ptr + part * D + d, acc, mask=dmask)
    tl.store(ml_ptr + part * 2, m_i)  # -inf and 0 for a split past the row's length
    tl.store(ml_ptr + part * 2 + 1, l_i)


@triton.jit
def _merge_kernel(acc_ptr, ml_ptr, len_ptr, o_ptr, so_b, so_h, SPLIT, N_SPLITS, H: tl.constexpr, D: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    used = tl.cdiv(tl.load(len_ptr + b).to(tl.int32), SPLIT)
    s = tl.arange(0, BLOCK_S)
    smask = s < used
    part = bh * N_SPLITS + s
    m = tl.load(ml_ptr + part * 2, mask=smask, other=-float("inf"))
    l = tl.load(ml_ptr + part * 2 + 1, mask=smask, other=0.0)
    w = tl.exp2(m - tl.max(m, 0))
    w = tl.where(smask, w, 0.0)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    acc = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    o = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)
    tl.store(o_ptr + b * so_b + h * so_h + d, o.to(o_ptr.dtype.element_ty), mask=dmask)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def plan_splits(rows: int, heads: int, capacity: int, num_sms: int, block_n: int,
                programs_per_sm: int = 4) -> tuple[int, int]:
    """(keys per split, number of splits): about ``programs_per_sm`` programs per SM when every row is full,
    each split a whole number of key blocks, at most ``MAX_SPLITS`` splits."""
    want = min(MAX_SPLITS, max(1, math.ceil(programs_per_sm * num_sms / (rows * heads))),
               math.ceil(capacity / block_n))
    split = block_n * math.ceil(capacity / (want * block_n))
    return split, math.ceil(capacity / split)


def triton_decode_attention_refusal(q, keys, values, lengths, scale):
    """Why the Triton kernel cannot run these arguments, or None."""
    if q.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        return "q, keys and values need a contiguous last dimension"
    return None


def decode_attention_triton(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                            scale: float, block_n: int = 128, num_warps: int = 4, num_stages: int = 2,
                            programs_per_sm: int = 4) -> torch.Tensor:
    """Arguments as ``olmo_hybrid.ops.decode_attention`` (already checked). Safe to capture in a CUDA graph.
    block_n, num_warps, programs_per_sm: launch settings; the defaults were the fastest measured on an H100 at
    batch 1 (at batch 16, block_n=256 with 8 warps was 11% faster; docs/benchmarks.md, "Generation").
    """
    B, H, _, D = q.shape
    Hkv, capacity = keys.shape[1], keys.shape[2]
    split, n_splits = plan_splits(B, H, capacity, _num_sms(q.device), block_n, programs_per_sm)
    acc = torch.empty(B * H * n_splits, D, device=q.device, dtype=torch.float32)
    ml = torch.empty(B * H * n_splits, 2, device=q.device, dtype=torch.float32)
    out = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    block_d = triton.next_power_of_2(D)
    _partial_kernel[(B * H, n_splits)](
        q, keys, values, lengths, acc, ml, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
        keys.stride(2), values.stride(0), values.stride(1), values.stride(2), scale * _LOG2E, split, n_splits,
        H=H, GROUP=H // Hkv, D=D, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    _merge_kernel[(B * H,)](acc, ml, lengths, out, out.stride(0), out.stride(1), split, n_splits, H=H, D=D,
                            BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(n_splits), num_warps=4)
    return out
