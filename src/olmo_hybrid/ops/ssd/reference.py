"""Pure-PyTorch SSD (Mamba2's scalar-decay selective state space): chunked (training), token loop (the float64
oracle of the tests) and one decode step.

Per head h (group g = h // (H // G) supplies B and C), with the state S_t [P, N]:

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T;        y_t = S_t C_t + D_h x_t

In the kernels' notation this is linear attention with a scalar decay per token and head: q = C, k = B,
v = dt x, g = dt A (log-decay <= 0), state S^T [N, P]. Math runs in float32, or float64 when x is float64;
outputs are cast back to x's dtype, states stay in the compute dtype.

Chunked form (chunk C = 64, positions i, j inside a chunk, gamma = chunk-local cumsum of g). With
Gamma[i, j] = exp(gamma_i - gamma_j) for j <= i in the same document (else 0), a_i = exp(gamma_i) when no reset
lies in [0, i] (decay of the state entering the chunk, else 0), and S the state entering the chunk ([N, P]):

    Y = diag(a) Q S + ((Q K^T) * Gamma) V,         S_next = a_last S + (K * Gamma[last, :]^T)^T V

The intra-chunk products for all chunks are batched; only the cheap state pass loops over chunks. A reset at
token t clears the state before t is processed; resets enter only through Gamma and a.
"""

from __future__ import annotations

import torch

from ..chunked_decay import chunk_decays, compute_dtype, from_chunks, loop_scan, to_chunks
from ..varlen import scan_documents, step_result

CHUNK_SIZE = 64


def _expand_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., G, N] -> [..., H, N]: head h reads group h // (H // G)."""
    groups = t.shape[-2]
    return t if groups == heads else t.repeat_interleave(heads // groups, dim=-2)


def _chunk_scan(q, k, v, g, state, reset):
    """Chunked scan over rows [B, T, H, *]; state [B, H, N, P] (N = q/k dim, P = v dim). Returns (o, state)."""
    B, T, H, N = k.shape
    P = v.shape[-1]
    s = torch.zeros(B, H, N, P, dtype=q.dtype, device=q.device) if state is None else state
    if T == 0:
        return v.new_zeros(B, 0, H, P), s
    q, k, v, g = (to_chunks(x, CHUNK_SIZE) for x in (q, k, v, g))
    decay, decay_in = chunk_decays(g, reset)

    k_out = (k * decay[..., -1, :, None]).transpose(-1, -2)  # keys decayed to the end of their chunk, [N, C]
    kv = k_out @ v  # [B, H, n_chunks, N, P], each chunk's own contribution to the state leaving it
    decay_out = decay_in[..., -1, None, None]
    states = []
    # unbind once: indexing chunk n inside the loop would make autograd scatter into a full-size zero tensor per
    # chunk in backward.
    for kv_n, decay_n in zip(kv.unbind(2), decay_out.unbind(2)):
        states.append(s)
        s = decay_n * s + kv_n
    states = torch.stack(states, dim=2)  # [B, H, n_chunks, N, P], the state entering each chunk
    o = (q * decay_in[..., None]) @ states + (q @ k.transpose(-1, -2) * decay) @ v
    return from_chunks(o, T), s


def _step(q, k, v, g, s):
    """One token: q, k [B, H, N], v [B, H, P], g [B, H], s [B, H, N, P]."""
    s = s * g.exp()[..., None, None] + k[..., :, None] * v[..., None, :]
    return torch.einsum("bhnp,bhn->bhp", s, q), s


def _loop_scan(q, k, v, g, state, reset):
    """Token-by-token scan over rows [B, T, H, *]; state [B, H, N, P]."""
    return loop_scan(_step, q, k, v, g, state, reset)


def _run(scan, op, x, dt, A, B, C, D, initial_state, output_final_state, cu_seqlens, reset_mask):
    out_dtype, dtype = x.dtype, compute_dtype(x)
    H = x.shape[2]
    x, dt = x.to(dtype), dt.to(dtype)
    q, k = _expand_groups(C.to(dtype), H), _expand_groups(B.to(dtype), H)
    v, g = x * dt[..., None], dt * A.to(dtype)
    state = None if initial_state is None else initial_state.to(dtype).transpose(-1, -2)  # [P, N] -> [N, P]
    o, s = scan_documents(scan, op, (q, k, v, g), state, reset_mask, cu_seqlens)
    if D is not None:
        o = o + D.to(dtype)[:, None] * x
    return o.to(out_dtype), (s.transpose(-1, -2) if output_final_state else None)


def ssd_torch(x, dt, A, B, C, D=None, initial_state=None, output_final_state=False, cu_seqlens=None,
              reset_mask=None, settings=None):
    """Chunked reference (see the module docstring); arguments as ``olmo_hybrid.ops.ssd`` (``settings`` tunes
    the Triton kernels only)."""
    return _run(_chunk_scan, "ssd", x, dt, A, B, C, D, initial_state, output_final_state, cu_seqlens, reset_mask)


def recurrent_ssd_torch(x, dt, A, B, C, D=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                        reset_mask=None):
    """Token-loop reference; arguments as ``olmo_hybrid.ops.recurrent_ssd``."""
    return _run(_loop_scan, "recurrent_ssd", x, dt, A, B, C, D, initial_state, output_final_state, cu_seqlens,
                reset_mask)


def ssd_step_torch(x, dt, A, B, C, state, D=None, inplace=False, active=None):
    """One decode token; arguments as ``olmo_hybrid.ops.ssd_step`` (the specification of ``inplace`` and
    ``active``)."""
    dtype = compute_dtype(x)
    H = x.shape[1]
    xs, dts = x.to(dtype), dt.to(dtype)
    b, c = _expand_groups(B.to(dtype), H), _expand_groups(C.to(dtype), H)
    decay = (dts * A.to(dtype)).exp()
    new = state.to(dtype) * decay[..., None, None] + (dts[..., None] * xs)[..., :, None] * b[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new, c)
    if D is not None:
        y = y + D.to(dtype)[:, None] * xs
    return step_result(y.to(x.dtype), new, state, active, inplace)
