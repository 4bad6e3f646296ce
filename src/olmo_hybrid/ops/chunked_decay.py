"""What the chunked PyTorch references of the gated delta rule and of SSD share: both are linear attention with
one scalar log-decay g per token and head, scanned a chunk at a time.

Inside a chunk (positions i, j), ``decay[i, j] = exp(sum of g over (j, i])`` when j <= i and no document starts in
(j, i], else 0; ``decay_in[i] = exp(sum of g over [0, i])`` when no document starts in [0, i], else 0 (how much of
the state entering the chunk survives to i).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (so the token loops can serve as float64 oracles)."""
    return torch.promote_types(x.dtype, torch.float32)


def to_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """[B, T, H, *] -> [B, H, n_chunks, chunk, *], zero padded at the end (g = 0 and a zero update keep the state
    unchanged through the padding)."""
    B, T, H = x.shape[:3]
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T
    x = x.transpose(1, 2)
    x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
    return x.reshape(B, H, n_chunks, chunk, *x.shape[3:])


def from_chunks(o: torch.Tensor, length: int) -> torch.Tensor:
    """[B, H, n_chunks, chunk, V] -> [B, length, H, V], the padding dropped."""
    B, H, n_chunks, chunk, V = o.shape
    return o.reshape(B, H, n_chunks * chunk, V)[:, :, :length].transpose(1, 2)


def chunk_decays(g: torch.Tensor, reset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(decay [B, H, n, C, C], decay_in [B, H, n, C])`` from chunked log-decays g [B, H, n, C] and an optional
    reset mask [B, T] (True where a document starts)."""
    B, _, n_chunks, C = g.shape
    causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    # Gate sums over (j, i] as sums of those terms only, not differences of cumsums: with strongly negative gates
    # the chunk cumsum reaches ~1e3 and its float32 differences would lose ~1e-4 absolute.
    gate_sums = g[..., :, None].expand(*g.shape, C).tril(-1).cumsum(-2)
    decay_in = g.cumsum(-1).exp()
    if reset is None:
        connected = causal
    else:
        seg = F.pad(reset, (0, n_chunks * C - reset.shape[1])).reshape(B, 1, n_chunks, C).cumsum(-1)
        connected = causal & (seg[..., :, None] == seg[..., None, :])
        decay_in = decay_in * (seg == 0)
    # Masked entries become -inf before exp, so exp never sees a positive exponent (no inf, no NaN gradients).
    return gate_sums.masked_fill(~connected, float("-inf")).exp(), decay_in


def loop_scan(step, q, k, v, g, state, reset, *per_token):
    """Token-by-token scan over rows [B, T, H, *]: ``o_t, s = step(q_t, k_t, v_t, g_t, *per_token_t, s)``, the state
    [B, H, K, V] (zeros when ``state`` is None) cleared where ``reset`` [B, T] starts a document."""
    B, T, H = k.shape[:3]
    s = torch.zeros(B, H, k.shape[-1], v.shape[-1], dtype=q.dtype, device=q.device) if state is None else state
    outs = []
    for t in range(T):
        if reset is not None:
            s = torch.where(reset[:, t, None, None, None], 0.0, s)
        o, s = step(q[:, t], k[:, t], v[:, t], g[:, t], *(x[:, t] for x in per_token), s)
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, v.shape[-1])
    return o, s
