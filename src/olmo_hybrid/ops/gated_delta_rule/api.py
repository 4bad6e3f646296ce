"""The gated delta rule's public ops: argument checks, documentation and the call into the chosen backend.

Layouts follow flash-linear-attention (time-major): q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV];
recurrent state [N, HV, K, V] in float32. HV may be a multiple of H (grouped value heads): value head h reads
key/query head h // (HV // H).

Document boundaries, for the full-sequence ops (see also ``olmo_hybrid/ops/varlen.py``):
- ``cu_seqlens`` int [N+1]: B must be 1; the N documents are packed along T; each starts from its own row of
  ``initial_state`` (zeros if None) and gets its own row of the final state (N rows).
- ``reset_mask`` bool [B, T]: True at the first token of a document; the state is cleared before that token is
  processed. Row b starts from ``initial_state[b]`` (which a reset at t = 0 discards), and the final state is row
  b's state after its last token. Both arguments may be combined (B == 1).

Backends: see ``olmo_hybrid/ops/dispatch.py``; ``settings`` (:class:`olmo_hybrid.ops.KernelSettings`) tunes the
Triton kernels.
"""

from __future__ import annotations

import torch

from ..checks import (
    check_active,
    check_boundaries,
    check_float,
    check_inplace_state,
    check_shape,
    resolve_settings,
)
from ..dispatch import select
from olmo_hybrid.config import KernelSettings


def _check_sequence_args(op, q, k, v, g, beta, scale, initial_state, cu_seqlens, reset_mask) -> float:
    check_float(op, q=q, k=k, v=v, g=g, beta=beta)
    if q.dim() != 4:
        raise ValueError(f"{op}: q must have shape [B, T, H, K], got {list(q.shape)}")
    B, T, H, K = q.shape
    check_shape(op, "k", k, q.shape, "[B, T, H, K] (as q)")
    if v.dim() != 4 or v.shape[:2] != (B, T) or v.shape[2] % H != 0:
        raise ValueError(f"{op}: v must have shape [B={B}, T={T}, HV, V] with HV a multiple of H={H}, "
                         f"got {list(v.shape)}")
    HV, V = v.shape[2:]
    check_shape(op, "g", g, (B, T, HV), "[B, T, HV]")
    check_shape(op, "beta", beta, (B, T, HV), "[B, T, HV]")
    N = check_boundaries(op, B, T, cu_seqlens, reset_mask)
    if initial_state is not None:
        check_float(op, initial_state=initial_state)
        check_shape(op, "initial_state", initial_state, (N, HV, K, V), "[N, HV, K, V]")
    return K ** -0.5 if scale is None else float(scale)


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     use_qk_l2norm_in_kernel=False, reset_mask=None, *, settings: KernelSettings | None = None,
                     backend=None):
    """Gated delta rule over full sequences (chunked algorithm). Returns ``(o, final_state)``.

    Per value head, with S [K, V]: S_t = exp(g_t) S_{t-1}; delta = beta_t (v_t - S_t^T k_t); S_t += k_t delta^T;
    o_t = scale S_t^T q_t.

    q, k: [B, T, H, K]. v: [B, T, HV, V]. g: [B, T, HV] log-decay (<= 0; not checked, to avoid a device sync).
    beta: [B, T, HV] (in (0, 1), or (0, 2) for negative eigenvalues). scale: default K ** -0.5.
    initial_state: [N, HV, K, V] (N = B, or the number of documents with cu_seqlens), or None for zeros.
    output_final_state: return the state after the last token (float32; float64 for float64 inputs), else None.
    cu_seqlens / reset_mask: document boundaries, see the module docstring.
    use_qk_l2norm_in_kernel: replace q, k by x / sqrt(sum x^2 + 1e-6) (in float32) first; differentiable.
    settings: the Triton kernels' dot precision and tiles (None: the defaults).
    backend: "auto" | "torch" | "triton" | "fla", or None for the enclosing ``ops.use_backend`` (else "auto").
    o: [B, T, HV, V] in q's dtype. Differentiable wrt q, k, v, g, beta and initial_state.
    """
    op = "gated_delta_rule"
    scale = _check_sequence_args(op, q, k, v, g, beta, scale, initial_state, cu_seqlens, reset_mask)
    args = dict(q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, reset_mask=reset_mask,
                settings=resolve_settings(op, settings))
    return select(op, backend, q.device, args)(**args)


def recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, use_qk_l2norm_in_kernel=False, reset_mask=None, *, backend=None):
    """Same op and arguments as :func:`gated_delta_rule`, computed token by token (decode/prefill of short
    sequences; the float64 oracle of the tests: with the torch backend, float64 inputs compute in float64)."""
    op = "recurrent_gated_delta_rule"
    scale = _check_sequence_args(op, q, k, v, g, beta, scale, initial_state, cu_seqlens, reset_mask)
    args = dict(q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, reset_mask=reset_mask)
    return select(op, backend, q.device, args)(**args)


def gated_delta_rule_step(q, k, v, g, beta, state, scale=None, use_qk_l2norm_in_kernel=False, *, inplace=False,
                          active=None, settings: KernelSettings | None = None, backend=None):
    """One decode token. Returns ``(o, state_out)``.

    q, k: [B, H, K]. v: [B, HV, V]. g, beta: [B, HV]. state: [B, HV, K, V] (float32), e.g. rows ``pool[i:j]`` of
    a larger state pool. o: [B, HV, V] in q's dtype.
    inplace: False returns a new state (float32; float64 for float64 inputs) and leaves ``state`` unchanged;
    True writes the new state into ``state`` (which must already have that dtype) and returns it.
    active: bool [B] on the state's device, or None for all rows. Rows where it is False keep their state bit for
    bit (copied through when not in place); their outputs are zeros. Read on the device: no host sync.
    settings: accepted for uniformity with the other GDN ops; the decode step has no tunable numerics.
    """
    op = "gated_delta_rule_step"
    check_float(op, q=q, k=k, v=v, g=g, beta=beta, state=state)
    if q.dim() != 3:
        raise ValueError(f"{op}: q must have shape [B, H, K], got {list(q.shape)}")
    B, H, K = q.shape
    check_shape(op, "k", k, q.shape, "[B, H, K] (as q)")
    if v.dim() != 3 or v.shape[0] != B or v.shape[1] % H != 0:
        raise ValueError(f"{op}: v must have shape [B={B}, HV, V] with HV a multiple of H={H}, got {list(v.shape)}")
    HV, V = v.shape[1:]
    check_shape(op, "g", g, (B, HV), "[B, HV]")
    check_shape(op, "beta", beta, (B, HV), "[B, HV]")
    check_shape(op, "state", state, (B, HV, K, V), "[B, HV, K, V]")
    check_active(op, active, B, state.device)
    if inplace:
        check_inplace_state(op, "state", state, torch.promote_types(q.dtype, torch.float32))
    resolve_settings(op, settings)
    args = dict(q=q, k=k, v=v, g=g, beta=beta, state=state, scale=K ** -0.5 if scale is None else float(scale),
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, inplace=bool(inplace), active=active)
    return select(op, backend, q.device, args)(**args)
