"""The "fla" backend: flash-linear-attention's Triton kernels, for cross-checking on CUDA.

Imported lazily by the dispatcher (``backend.py``); importing it fails with ImportError when fla is missing.
fla has no CPU path, no float64 kernels and no reset_mask, so those calls are refused (explicit ``backend="fla"``
raises with the reason). The conv ops are not provided.
"""

from __future__ import annotations

import torch
from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

from .backend import register


def _supports(q, reset_mask=None, **_) -> str | None:
    if q.device.type != "cuda":
        return f"fla kernels need CUDA tensors, got {q.device.type}"
    if q.dtype == torch.float64:
        return "fla kernels do not support float64"
    if reset_mask is not None:
        return "fla kernels do not support reset_mask (pass cu_seqlens with B == 1 instead)"
    return None


def _full(kernel):
    def run(q, k, v, g, beta, scale, initial_state=None, output_final_state=False, cu_seqlens=None,
            use_qk_l2norm_in_kernel=False, reset_mask=None):
        return kernel(q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                      use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    return run


def _step(q, k, v, g, beta, state, scale, use_qk_l2norm_in_kernel=False):
    o, new_state = fused_recurrent_gated_delta_rule(
        q=q[:, None], k=k[:, None], v=v[:, None], g=g[:, None], beta=beta[:, None], scale=scale,
        initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    return o[:, 0], new_state


register("gated_delta_rule", "fla", _full(chunk_gated_delta_rule), supports=_supports)
register("recurrent_gated_delta_rule", "fla", _full(fused_recurrent_gated_delta_rule), supports=_supports)
register("gated_delta_rule_step", "fla", _step, supports=_supports)
