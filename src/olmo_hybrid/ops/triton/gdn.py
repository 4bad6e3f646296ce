"""torch.library custom ops around the Triton gated-delta-rule kernels, and the backend functions.

The ops are opaque to torch.compile (which traces them through their fake implementations, so a model using
them compiles without graph breaks) and carry their own autograd formula:

- ``olmo_hybrid::gdr_chunk_fwd`` / ``olmo_hybrid::gdr_chunk_bwd``: chunked forward (saving the per-chunk states
  only when a gradient is needed) and its backward (see ``gdn_chunk.py``).
- ``olmo_hybrid::gdr_step``: one decode token, new state out of place; ``olmo_hybrid::gdr_step_``: the same,
  updating ``state`` in place (exposed as :func:`gated_delta_rule_step_inplace`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .gdn_chunk import CHUNK, _dot_precision, _operand_dtype, chunk_gdr_fwd
from .gdn_chunk_bwd import chunk_gdr_bwd
from .gdn_step import step_forward

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _n_chunks_max(B: int, T: int, cu_seqlens: Optional[Tensor]) -> int:
    # Must agree with gdn_chunk.chunk_tables (the fake implementations need the same static shapes).
    if cu_seqlens is None:
        return B * (-(-T // CHUNK))
    return T // CHUNK + cu_seqlens.numel() - 1


@torch.library.custom_op("olmo_hybrid::gdr_chunk_fwd", mutates_args=())
def gdr_chunk_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
                  initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], reset_mask: Optional[Tensor],
                  use_l2norm: bool, save_states: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return chunk_gdr_fwd(q, k, v, g, beta, scale, initial_state, cu_seqlens, reset_mask, use_l2norm, save_states)


@gdr_chunk_fwd.register_fake
def _(q, k, v, g, beta, scale, initial_state, cu_seqlens, reset_mask, use_l2norm, save_states):
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    nc = _n_chunks_max(B, T, cu_seqlens)
    f32 = dict(device=q.device, dtype=torch.float32)
    ops = dict(device=q.device, dtype=_operand_dtype(_dot_precision(q.dtype)))
    return (q.new_empty(B, T, HV, V), torch.empty(N, HV, K, V, **f32), torch.empty(B, T, HV, **f32),
            torch.empty(2, nc, HV, CHUNK, CHUNK, **f32), torch.empty(nc, HV, CHUNK, CHUNK, **ops),
            torch.empty((nc, HV, K, V) if save_states else (0,), **ops),
            torch.empty((B, T, HV, V) if save_states else (0,), **ops))


@torch.library.custom_op("olmo_hybrid::gdr_chunk_bwd", mutates_args=())
def gdr_chunk_bwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
                  cu_seqlens: Optional[Tensor], reset_mask: Optional[Tensor], use_l2norm: bool, gamma: Tensor,
                  tt: Tensor, p: Tensor, states: Tensor, vn: Tensor, do: Tensor, dht: Optional[Tensor]
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return chunk_gdr_bwd(q, k, v, g, beta, scale, cu_seqlens, reset_mask, use_l2norm, gamma, tt, p, states, vn,
                         do, dht)


@gdr_chunk_bwd.register_fake
def _(q, k, v, g, beta, scale, cu_seqlens, reset_mask, use_l2norm, gamma, tt, p, states, vn, do, dht):
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    HV, V = v.shape[2:]
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), torch.empty(N, HV, q.shape[3], V, device=q.device, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, scale, initial_state, cu_seqlens, reset_mask, use_l2norm, save_states = inputs
    _, _, gamma, tt, p, states, vn = output
    if not save_states:
        raise RuntimeError("gdr_chunk_fwd was called without save_states=True but a gradient is required")
    ctx.save_for_backward(q, k, v, g, beta, cu_seqlens, reset_mask, gamma, tt, p, states, vn)
    # Unused outputs (the final state, the saved buffers) get None instead of zero-filled gradients, which for
    # the per-chunk states would be a memset as large as the states themselves.
    ctx.set_materialize_grads(False)
    ctx.scale, ctx.use_l2norm = scale, use_l2norm
    ctx.h0_dtype = None if initial_state is None else initial_state.dtype


def _backward(ctx, do, dht, *_):
    q, k, v, g, beta, cu_seqlens, reset_mask, gamma, tt, p, states, vn = ctx.saved_tensors
    if do is None:
        do = torch.zeros(*q.shape[:2], *v.shape[2:], device=q.device, dtype=q.dtype)
    dq, dk, dv, dg, dbeta, dh0 = gdr_chunk_bwd(q, k, v, g, beta, ctx.scale, cu_seqlens, reset_mask,
                                               ctx.use_l2norm, gamma, tt, p, states, vn, do, dht)
    dh0 = None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype)
    return dq, dk, dv, dg, dbeta, None, dh0, None, None, None, None


gdr_chunk_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("olmo_hybrid::gdr_step", mutates_args=())
def gdr_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor, scale: float,
             use_l2norm: bool) -> tuple[Tensor, Tensor]:
    new_state = torch.empty(state.shape, device=state.device, dtype=torch.float32)
    return step_forward(q, k, v, g, beta, state, new_state, scale, use_l2norm), new_state


@gdr_step.register_fake
def _(q, k, v, g, beta, state, scale, use_l2norm):
    return q.new_empty(*v.shape), torch.empty(state.shape, device=state.device, dtype=torch.float32)


@torch.library.custom_op("olmo_hybrid::gdr_step_", mutates_args=("state",))
def gdr_step_(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor, scale: float,
              use_l2norm: bool) -> Tensor:
    return step_forward(q, k, v, g, beta, state, state, scale, use_l2norm)


@gdr_step_.register_fake
def _(q, k, v, g, beta, state, scale, use_l2norm):
    return q.new_empty(*v.shape)


# ------------------------------------------------------------------------------------------------------------
# Backend functions (signatures of the "torch" implementations in olmo_hybrid/ops/gdn_reference.py).


def _device_ok(t: Tensor) -> bool:
    from ._interpret import interpreting

    return t.device.type == "cuda" or (t.device.type == "cpu" and interpreting())


def supports_chunk(q, k, v, g, beta, initial_state=None, cu_seqlens=None, reset_mask=None, **_) -> str | None:
    if not _device_ok(q):
        return f"Triton kernels need CUDA tensors, got {q.device.type}"
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if t.dtype not in _FLOAT_DTYPES:
            return f"{name} has dtype {t.dtype}; the Triton kernels take float32, bfloat16 or float16"
    if q.shape[-1] > 128:
        # The backward's fp32 operand tiles of 64 x K exceed the 227 KB of shared memory per block beyond K=128.
        return f"key head dim K={q.shape[-1]} > 128 is not supported by the Triton chunk kernels yet"
    return None


def supports_step(q, k, v, g, beta, state, **_) -> str | None:
    if not _device_ok(q):
        return f"Triton kernels need CUDA tensors, got {q.device.type}"
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if t.dtype not in _FLOAT_DTYPES:
            return f"{name} has dtype {t.dtype}; the Triton kernels take float32, bfloat16 or float16"
    if state.dtype != torch.float32:
        return f"state has dtype {state.dtype}; the Triton decode kernel keeps float32 states"
    return None


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gated_delta_rule_triton(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                            cu_seqlens=None, use_qk_l2norm_in_kernel=False, reset_mask=None):
    """Chunked gated delta rule on the Triton kernels; arguments as ``olmo_hybrid.ops.gated_delta_rule``.

    cu_seqlens must run from 0 to T without decreasing; unlike the torch reference this path does not check it
    (that would cost a device sync per call)."""
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(q.device)
    if reset_mask is not None:
        reset_mask = reset_mask.to(q.device)
    save = _grad_needed(q, k, v, g, beta, initial_state)
    o, final_state, *_ = gdr_chunk_fwd(q, k, v, g, beta, float(scale), initial_state, cu_seqlens, reset_mask,
                                       bool(use_qk_l2norm_in_kernel), save)
    return o, (final_state if output_final_state else None)


def gated_delta_rule_step_triton(q, k, v, g, beta, state, scale, use_qk_l2norm_in_kernel=False):
    """One decode token; ``state`` is left unchanged (see :func:`gated_delta_rule_step_inplace`)."""
    return gdr_step(q, k, v, g, beta, state, float(scale), bool(use_qk_l2norm_in_kernel))


def gated_delta_rule_step_inplace(q, k, v, g, beta, state, scale=None, use_qk_l2norm_in_kernel=False):
    """One decode token updating the float32 ``state`` [B, HV, K, V] in place; returns o [B, HV, V].

    Shapes as ``olmo_hybrid.ops.gated_delta_rule_step``; scale defaults to K ** -0.5."""
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 tensor for the in-place update, got {state.dtype}"
                         f"{'' if state.is_contiguous() else ' (non-contiguous)'}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return gdr_step_(q, k, v, g, beta, state, scale, bool(use_qk_l2norm_in_kernel))
