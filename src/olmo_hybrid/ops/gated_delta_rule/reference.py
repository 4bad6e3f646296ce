"""Pure-PyTorch gated delta rule: chunked (training), token loop (oracle / decode) and single step.

Per value head, with the state S in [K, V] layout (fla's convention):

    S_t = exp(g_t) * S_{t-1};   delta_t = beta_t * (v_t - S_t^T k_t);   S_t += k_t delta_t^T;   o_t = scale * S_t^T q_t

These are the "torch" backend of the public ops (``api.py`` validates the arguments and documents them). Math
runs in float32, or float64 when q is float64 (so the token loop can serve as a float64 oracle); outputs are cast
back to q's dtype, states stay in the compute dtype.

Chunked form (chunk C = CHUNK_SIZE, positions i, j inside a chunk, Gamma = chunk-local cumsum of g). Let
D[i, j] = exp(Gamma_i - Gamma_j) if j <= i and no reset lies in (j, i], else 0, and d_i = exp(Gamma_i) if no
reset lies in [0, i], else 0 (decay of the state entering the chunk). Unrolling the recurrence inside a chunk
whose entering state is S, the updates delta (rows delta_i) solve a unit lower-triangular ("UT") system:

    (I + A) delta = diag(beta) (V - diag(d) K S),   A = strict_tril(diag(beta) (K K^T) * D)
    delta = U - W S,   U = (I + A)^-1 diag(beta) V,   W = (I + A)^-1 diag(beta d) K

and then  O = (Q * d) S + ((Q K^T) * D) delta,   S_next = d_last S + (K * D[last, :])^T delta.
The triangular solves for all chunks are batched; only the cheap state pass (two matmuls per chunk) loops.
Resets enter only through D and d, so documents packed in a row never mix, with no padding per document.
"""

from __future__ import annotations

import torch

from ..chunked_decay import chunk_decays, compute_dtype, from_chunks, loop_scan, to_chunks
from ..varlen import scan_documents, step_result

# 32, not the Triton kernels' 64: on the CPU the smaller chunk does about a quarter fewer flops (the intra-chunk
# matrices shrink, the state pass stays) and trains the tiny model ~5% faster, with the same accuracy.
CHUNK_SIZE = 32
L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + 1e-6) over the last dim (fla's in-kernel q/k normalisation)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def _prepare_qk(q, k, num_v_heads: int, scale: float, use_qk_l2norm: bool, dtype: torch.dtype):
    """Cast, optionally l2-normalise, fold the scale into q, and repeat q/k heads for grouped value heads.

    The head axis is dim -2 ([..., H, K]); value head h uses key head h // (HV // H)."""
    q, k = q.to(dtype), k.to(dtype)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    groups = num_v_heads // q.shape[-2]
    if groups > 1:
        q, k = q.repeat_interleave(groups, dim=-2), k.repeat_interleave(groups, dim=-2)
    return q * scale, k


def _chunk_scan(q, k, v, g, beta, state, reset):
    """Chunked gated delta rule over rows [B, T, HV, *] (q already scaled); returns (o, final state)."""
    B, T, HV, K = k.shape
    V = v.shape[-1]
    s = torch.zeros(B, HV, K, V, dtype=q.dtype, device=q.device) if state is None else state.to(q.dtype)
    if T == 0:
        return v.new_zeros(B, 0, HV, V), s
    q, k, v, g, beta = (to_chunks(x, CHUNK_SIZE) for x in (q, k, v, g, beta))
    decay, decay_in = chunk_decays(g, reset)

    beta_ = beta[..., None]
    a = ((beta_ * k) @ k.transpose(-1, -2) * decay).tril(-1)
    rhs = torch.cat([beta_ * v, (beta_ * decay_in[..., None]) * k], dim=-1)
    # Solved as X^T (I + A)^T = rhs^T: the same system, about twice as fast on CPU (no column-major copies).
    x = torch.linalg.solve_triangular(a.mT, rhs.mT, upper=True, left=False, unitriangular=True).mT
    u, w = x.split([V, K], dim=-1)
    k_out = k * decay[..., -1, :, None]  # each key decayed to the end of its chunk
    decay_out = decay_in[..., -1, None, None]

    states, deltas = [], []
    # unbind once: indexing chunk n inside the loop would make autograd scatter into a full-size zero tensor per
    # chunk in backward.
    for u_n, w_n, k_n, decay_n in zip(u.unbind(2), w.unbind(2), k_out.transpose(-1, -2).unbind(2),
                                      decay_out.unbind(2)):
        delta = u_n - w_n @ s
        states.append(s)
        deltas.append(delta)
        s = decay_n * s + k_n @ delta
    states = torch.stack(states, dim=2)  # [B, HV, n_chunks, K, V], state entering each chunk
    deltas = torch.stack(deltas, dim=2)
    o = (q * decay_in[..., None]) @ states + (q @ k.transpose(-1, -2) * decay) @ deltas
    return from_chunks(o, T), s


def _loop_scan(q, k, v, g, beta, state, reset):
    """Token-by-token gated delta rule over rows [B, T, HV, *] (q already scaled)."""
    return loop_scan(_step, q, k, v, g, None if state is None else state.to(q.dtype), reset, beta)


def _step(q, k, v, g, beta, s):
    """One token: q, k [B, HV, K] (q scaled), v [B, HV, V], g, beta [B, HV], s [B, HV, K, V]."""
    s = s * g.exp()[..., None, None]
    delta = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", s, k))
    s = s + k[..., :, None] * delta[..., None, :]
    return torch.einsum("bhkv,bhk->bhv", s, q), s


def _run(scan, op, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
         use_qk_l2norm_in_kernel, reset_mask):
    out_dtype, dtype = q.dtype, compute_dtype(q)
    q, k = _prepare_qk(q, k, v.shape[2], scale, use_qk_l2norm_in_kernel, dtype)
    v, g, beta = v.to(dtype), g.to(dtype), beta.to(dtype)
    o, s = scan_documents(scan, op, (q, k, v, g, beta), initial_state, reset_mask, cu_seqlens)
    return o.to(out_dtype), (s if output_final_state else None)


def chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                                 cu_seqlens=None, use_qk_l2norm_in_kernel=False, reset_mask=None, settings=None):
    """Chunked reference (see the module docstring); arguments as ``olmo_hybrid.ops.gated_delta_rule``
    (``settings`` concerns the Triton kernels only)."""
    return _run(_chunk_scan, "gated_delta_rule", q, k, v, g, beta, scale, initial_state, output_final_state,
                cu_seqlens, use_qk_l2norm_in_kernel, reset_mask)


def recurrent_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                                     cu_seqlens=None, use_qk_l2norm_in_kernel=False, reset_mask=None):
    """Token-loop reference; arguments as ``olmo_hybrid.ops.recurrent_gated_delta_rule``."""
    return _run(_loop_scan, "recurrent_gated_delta_rule", q, k, v, g, beta, scale, initial_state,
                output_final_state, cu_seqlens, use_qk_l2norm_in_kernel, reset_mask)


def gated_delta_rule_step_torch(q, k, v, g, beta, state, scale, use_qk_l2norm_in_kernel=False, inplace=False,
                                active=None):
    """One decode step; arguments as ``olmo_hybrid.ops.gated_delta_rule_step`` (the specification of
    ``inplace`` and ``active``)."""
    dtype = compute_dtype(q)
    qs, ks = _prepare_qk(q, k, v.shape[1], scale, use_qk_l2norm_in_kernel, dtype)
    o, s = _step(qs, ks, v.to(dtype), g.to(dtype), beta.to(dtype), state.to(dtype))
    return step_result(o.to(q.dtype), s, state, active, inplace)
