"""Public ops: argument checks, documentation and backend dispatch (see ``backend.py`` for the backends).

Layouts follow flash-linear-attention (time-major): q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV];
recurrent state [N, HV, K, V] in float32. HV may be a multiple of H (grouped value heads): value head h reads
key/query head h // (HV // H).

Document boundaries, for every full-sequence op:
- ``cu_seqlens`` int [N+1]: B must be 1; the N documents are packed along T; each starts from its own row of
  ``initial_state`` (zeros if None) and gets its own row of the final state (N rows).
- ``reset_mask`` bool [B, T]: True at the first token of a document; the state (conv context) is cleared before
  that token is processed. Row b starts from ``initial_state[b]`` (which a reset at t = 0 discards), and the
  final state is row b's state after its last token. Both arguments may be combined (B == 1).
"""

from __future__ import annotations

import torch

from . import attention, conv, gdn_reference  # noqa: F401  (registers the "torch" backend)
from .backend import resolve


def _check_float(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = f"{t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {got}")


def _check_shape(op: str, name: str, t: torch.Tensor | None, shape: tuple, layout: str) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {layout} = {list(shape)}, got {list(t.shape)}")


def _check_boundaries(op: str, B: int, T: int, cu_seqlens, reset_mask) -> int:
    """Validate document-boundary arguments; returns N, the number of state rows."""
    if reset_mask is not None:
        _check_shape(op, "reset_mask", reset_mask, (B, T), "[B, T]")
        if reset_mask.dtype != torch.bool:
            raise TypeError(f"{op}: reset_mask must be a bool tensor, got {reset_mask.dtype}")
    if cu_seqlens is None:
        return B
    if B != 1:
        raise ValueError(f"{op}: cu_seqlens requires B == 1 (documents packed along T), got B={B}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"{op}: cu_seqlens must be a 1-D integer tensor [N+1], got {list(cu_seqlens.shape)} "
                         f"{cu_seqlens.dtype}")
    return cu_seqlens.numel() - 1


def _check_gdr(op, q, k, v, g, beta, scale, initial_state, cu_seqlens, reset_mask) -> float:
    _check_float(op, q=q, k=k, v=v, g=g, beta=beta)
    if q.dim() != 4:
        raise ValueError(f"{op}: q must have shape [B, T, H, K], got {list(q.shape)}")
    B, T, H, K = q.shape
    _check_shape(op, "k", k, q.shape, "[B, T, H, K] (as q)")
    if v.dim() != 4 or v.shape[:2] != (B, T) or v.shape[2] % H != 0:
        raise ValueError(f"{op}: v must have shape [B={B}, T={T}, HV, V] with HV a multiple of H={H}, "
                         f"got {list(v.shape)}")
    HV, V = v.shape[2:]
    _check_shape(op, "g", g, (B, T, HV), "[B, T, HV]")
    _check_shape(op, "beta", beta, (B, T, HV), "[B, T, HV]")
    N = _check_boundaries(op, B, T, cu_seqlens, reset_mask)
    if initial_state is not None:
        _check_float(op, initial_state=initial_state)
        _check_shape(op, "initial_state", initial_state, (N, HV, K, V), "[N, HV, K, V]")
    return K ** -0.5 if scale is None else float(scale)


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     use_qk_l2norm_in_kernel=False, reset_mask=None, backend=None):
    """Gated delta rule over full sequences (chunked algorithm). Returns ``(o, final_state)``.

    Per value head, with S [K, V]: S_t = exp(g_t) S_{t-1}; delta = beta_t (v_t - S_t^T k_t); S_t += k_t delta^T;
    o_t = scale S_t^T q_t.

    q, k: [B, T, H, K]. v: [B, T, HV, V]. g: [B, T, HV] log-decay (<= 0; not checked, to avoid a device sync).
    beta: [B, T, HV] (in (0, 1), or (0, 2) for negative eigenvalues). scale: default K ** -0.5.
    initial_state: [N, HV, K, V] (N = B, or the number of documents with cu_seqlens), or None for zeros.
    output_final_state: return the state after the last token (float32; float64 for float64 inputs), else None.
    cu_seqlens / reset_mask: document boundaries, see the module docstring.
    use_qk_l2norm_in_kernel: replace q, k by x / sqrt(sum x^2 + 1e-6) (in float32) first; differentiable.
    backend: "auto" | "torch" | "triton" | "fla", or None for the module default (``set_backend``).
    o: [B, T, HV, V] in q's dtype. Differentiable wrt q, k, v, g, beta and initial_state.
    """
    scale = _check_gdr("gated_delta_rule", q, k, v, g, beta, scale, initial_state, cu_seqlens, reset_mask)
    args = dict(q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, reset_mask=reset_mask)
    return resolve("gated_delta_rule", backend, q.device, args)(**args)


def recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, use_qk_l2norm_in_kernel=False, reset_mask=None, backend=None):
    """Same op and arguments as :func:`gated_delta_rule`, computed token by token (decode/prefill of short
    sequences; the float64 oracle of the tests: with the torch backend, float64 inputs compute in float64)."""
    scale = _check_gdr("recurrent_gated_delta_rule", q, k, v, g, beta, scale, initial_state, cu_seqlens,
                       reset_mask)
    args = dict(q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, reset_mask=reset_mask)
    return resolve("recurrent_gated_delta_rule", backend, q.device, args)(**args)


def gated_delta_rule_step(q, k, v, g, beta, state, scale=None, use_qk_l2norm_in_kernel=False, backend=None):
    """One decode token. Returns ``(o, new_state)``.

    q, k: [B, H, K]. v: [B, HV, V]. g, beta: [B, HV]. state: [B, HV, K, V] (float32).
    o: [B, HV, V] in q's dtype; new_state float32 (float64 for float64 inputs). The torch reference never
    modifies ``state``; a fast backend may offer in-place updates through its own entry point, not through this
    function, so callers can always rely on ``state`` being unchanged here.
    """
    op = "gated_delta_rule_step"
    _check_float(op, q=q, k=k, v=v, g=g, beta=beta, state=state)
    if q.dim() != 3:
        raise ValueError(f"{op}: q must have shape [B, H, K], got {list(q.shape)}")
    B, H, K = q.shape
    _check_shape(op, "k", k, q.shape, "[B, H, K] (as q)")
    if v.dim() != 3 or v.shape[0] != B or v.shape[1] % H != 0:
        raise ValueError(f"{op}: v must have shape [B={B}, HV, V] with HV a multiple of H={H}, got {list(v.shape)}")
    HV, V = v.shape[1:]
    _check_shape(op, "g", g, (B, HV), "[B, HV]")
    _check_shape(op, "beta", beta, (B, HV), "[B, HV]")
    _check_shape(op, "state", state, (B, HV, K, V), "[B, HV, K, V]")
    args = dict(q=q, k=k, v=v, g=g, beta=beta, state=state, scale=K ** -0.5 if scale is None else float(scale),
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    return resolve(op, backend, q.device, args)(**args)


def _conv_weight(op: str, weight: torch.Tensor, C: int) -> torch.Tensor:
    if weight.dim() == 3 and weight.shape[1] == 1:  # the nn.Conv1d / HF checkpoint layout [C, 1, W]
        weight = weight[:, 0]
    if weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] < 1:
        raise ValueError(f"{op}: weight must have shape [C={C}, W] or [C, 1, W], got {list(weight.shape)}")
    return weight


def _check_activation(op: str, activation) -> None:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"{op}: activation must be 'silu', 'swish' or None, got {activation!r}")


def causal_conv1d(x, weight, activation="silu", initial_state=None, output_final_state=False, cu_seqlens=None,
                  reset_mask=None, backend=None):
    """Short causal depthwise convolution. Returns ``(y, final_state)``.

    x: [B, T, C]. weight: [C, W] (or [C, 1, W]); y_t = act(sum_j weight[:, j] * x_{t-(W-1)+j}).
    initial_state: [N, C, W-1], the W-1 inputs before the first token (oldest first); None means zeros.
    final_state (if output_final_state): [N, C, W-1] in x's dtype, the last W-1 inputs of each sequence/row
    (earlier positions taken from initial_state, or zero, when it is shorter than W-1 or when the row's last
    document is shorter than W-1 with reset_mask). cu_seqlens / reset_mask: see the module docstring; a document
    never sees inputs of another one. activation: "silu" (= "swish") or None. y has x's dtype.
    """
    op = "causal_conv1d"
    _check_float(op, x=x, weight=weight)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must have shape [B, T, C], got {list(x.shape)}")
    B, T, C = x.shape
    weight = _conv_weight(op, weight, C)
    _check_activation(op, activation)
    N = _check_boundaries(op, B, T, cu_seqlens, reset_mask)
    if initial_state is not None:
        _check_float(op, initial_state=initial_state)
        _check_shape(op, "initial_state", initial_state, (N, C, weight.shape[1] - 1), "[N, C, W-1]")
    args = dict(x=x, weight=weight, activation=activation, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, reset_mask=reset_mask)
    return resolve(op, backend, x.device, args)(**args)


def causal_conv1d_step(x, conv_state, weight, activation="silu", backend=None):
    """One decode token of :func:`causal_conv1d`. Returns ``(y, new_conv_state)``.

    x: [B, C]. conv_state: [B, C, W-1], the previous W-1 inputs (oldest first). y: [B, C] in x's dtype;
    new_conv_state: conv_state shifted left by one with x appended (conv_state's dtype); conv_state is unchanged.
    """
    op = "causal_conv1d_step"
    _check_float(op, x=x, conv_state=conv_state, weight=weight)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must have shape [B, C], got {list(x.shape)}")
    B, C = x.shape
    weight = _conv_weight(op, weight, C)
    _check_activation(op, activation)
    _check_shape(op, "conv_state", conv_state, (B, C, weight.shape[1] - 1), "[B, C, W-1]")
    args = dict(x=x, conv_state=conv_state, weight=weight, activation=activation)
    return resolve(op, backend, x.device, args)(**args)


def decode_attention(q, keys, values, lengths, scale=None, backend=None):
    """Softmax attention of one query per row over the first ``lengths[b]`` cached keys of row b.

    q: [B, H, 1, D]. keys, values: [B, Hkv, capacity, D], H a multiple of Hkv (grouped queries); any strides,
    e.g. rows of a larger cache pool. lengths: integer [B] on q's device, each in [1, capacity] (not checked:
    that would synchronise with the device). scale: default D ** -0.5. Returns [B, H, 1, D] in q's dtype.
    The Triton backend reads ``lengths`` on the device and is safe to capture in a CUDA graph.
    """
    op = "decode_attention"
    _check_float(op, q=q, keys=keys, values=values)
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"{op}: q must have shape [B, H, 1, D], got {list(q.shape)}")
    B, H, _, D = q.shape
    if keys.dim() != 4 or keys.shape[0] != B or keys.shape[3] != D or H % keys.shape[1]:
        raise ValueError(f"{op}: keys must have shape [B={B}, Hkv, capacity, D={D}] with H={H} a multiple of Hkv, "
                         f"got {list(keys.shape)}")
    _check_shape(op, "values", values, keys.shape, "[B, Hkv, capacity, D] (as keys)")
    if lengths.shape != (B,) or lengths.is_floating_point() or lengths.is_complex():
        raise ValueError(f"{op}: lengths must be an integer tensor [B={B}], got {lengths.dtype} {list(lengths.shape)}")
    args = dict(q=q, keys=keys, values=values, lengths=lengths, scale=D ** -0.5 if scale is None else float(scale))
    return resolve(op, backend, q.device, args)(**args)
