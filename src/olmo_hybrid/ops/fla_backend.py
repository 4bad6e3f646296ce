"""The "fla" backend: flash-linear-attention's Triton kernels, for cross-checking on CUDA.

Imported on first use by the dispatch table (``dispatch.py``); importing it fails with ImportError when fla is
missing. fla has no CPU path, no float64 kernels, no reset_mask and no active-row or in-place decode step, so
those calls are refused (explicit ``backend="fla"`` raises with the reason). The conv ops are not provided.
"""

from __future__ import annotations

import torch
from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


def fla_refusal(q, reset_mask=None, **_) -> str | None:
    """Why fla cannot run these arguments, or None."""
    if q.device.type != "cuda":
        return f"fla kernels need CUDA tensors, got {q.device.type}"
    if q.dtype == torch.float64:
        return "fla kernels do not support float64"
    if reset_mask is not None:
        return "fla kernels do not support reset_mask (pass cu_seqlens with B == 1 instead)"
    return None


def fla_step_refusal(q, inplace=False, active=None, **_) -> str | None:
    """Why fla cannot run this decode step, or None."""
    if inplace or active is not None:
        return "the fla backend has no in-place or active-row decode step"
    return fla_refusal(q)


def _sequence(kernel, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
              use_qk_l2norm_in_kernel):
    return kernel(q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                  use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)


def chunk_gated_delta_rule_fla(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                               cu_seqlens=None, use_qk_l2norm_in_kernel=False, reset_mask=None, settings=None):
    """fla's chunked kernels (``settings`` concerns our Triton kernels only)."""
    return _sequence(chunk_gated_delta_rule, q, k, v, g, beta, scale, initial_state, output_final_state,
                     cu_seqlens, use_qk_l2norm_in_kernel)


def recurrent_gated_delta_rule_fla(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                                   cu_seqlens=None, use_qk_l2norm_in_kernel=False, reset_mask=None):
    return _sequence(fused_recurrent_gated_delta_rule, q, k, v, g, beta, scale, initial_state, output_final_state,
                     cu_seqlens, use_qk_l2norm_in_kernel)


def gated_delta_rule_step_fla(q, k, v, g, beta, state, scale, use_qk_l2norm_in_kernel=False, inplace=False,
                              active=None):
    o, new_state = fused_recurrent_gated_delta_rule(
        q=q[:, None], k=k[:, None], v=v[:, None], g=g[:, None], beta=beta[:, None], scale=scale,
        initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    return o[:, 0], new_state
