"""torch.library custom ops around the Triton gated-delta-rule kernels, and the "triton" backend functions.

The ops are opaque to torch.compile (which traces them through their fake implementations, so a model using
them compiles without graph breaks) and carry their own autograd formula:

- ``olmo_hybrid::gdr_chunk_fwd`` / ``olmo_hybrid::gdr_chunk_bwd``: chunked forward (saving the per-chunk states
  only when a gradient is needed) and its backward (``chunk_fwd.py``, ``chunk_bwd.py``).
- ``olmo_hybrid::gdr_step``: one decode token, new state out of place; ``olmo_hybrid::gdr_step_``: the same,
  updating ``state`` in place (``step_kernel.py``).

torch.library takes primitive arguments only, so a :class:`KernelSettings` travels as its fields (the trailing
arguments of both chunk ops, named and ordered as the dataclass's fields: ``settings_args``) and is rebuilt inside;
the fake implementations read the dot precision from the same arguments, so traced graphs get the buffer dtypes
that the kernels produce.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from olmo_hybrid.config import KernelSettings
from ..triton_runtime import device_refusal, dtype_refusal, rows_contiguous
from .chunk_bwd import chunk_gdr_bwd
from .chunk_common import CHUNK, dot_precision, operand_dtype
from .chunk_fwd import chunk_gdr_fwd
from .step_kernel import step_forward

def settings_args(s: KernelSettings) -> tuple:
    """``s`` as the chunk ops' trailing arguments (``KernelSettings(*settings_args(s)) == s``)."""
    return (s.dot, s.backward_dot, s.block_v, s.warps, s.stages, s.backward_block_v, s.backward_warps,
            s.backward_stages)


def _n_chunks_max(B: int, T: int, cu_seqlens: Optional[Tensor]) -> int:
    # Must agree with chunk_common.chunk_tables (the fake implementations need the same static shapes).
    if cu_seqlens is None:
        return B * (-(-T // CHUNK))
    return T // CHUNK + cu_seqlens.numel() - 1


@torch.library.custom_op("olmo_hybrid::gdr_chunk_fwd", mutates_args=())
def gdr_chunk_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
                  initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], reset_mask: Optional[Tensor],
                  use_l2norm: bool, save_states: bool, dot: str, backward_dot: Optional[str], block_v: Optional[int],
                  warps: int, stages: int, backward_block_v: Optional[int], backward_warps: int,
                  backward_stages: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    settings = KernelSettings(dot, backward_dot, block_v, warps, stages, backward_block_v, backward_warps,
                              backward_stages)
    return chunk_gdr_fwd(q, k, v, g, beta, scale, initial_state, cu_seqlens, reset_mask, use_l2norm, save_states,
                         settings)


@gdr_chunk_fwd.register_fake
def _(q, k, v, g, beta, scale, initial_state, cu_seqlens, reset_mask, use_l2norm, save_states, dot, *_settings):
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    nc = _n_chunks_max(B, T, cu_seqlens)
    f32 = dict(device=q.device, dtype=torch.float32)
    ops = dict(device=q.device, dtype=operand_dtype(dot_precision(q.dtype, dot)))
    return (q.new_empty(B, T, HV, V), torch.empty(N, HV, K, V, **f32), torch.empty(B, T, HV, **f32),
            torch.empty(2, nc, HV, CHUNK, CHUNK, **f32), torch.empty(nc, HV, CHUNK, CHUNK, **ops),
            torch.empty((nc, HV, K, V) if save_states else (0,), **ops),
            torch.empty((B, T, HV, V) if save_states else (0,), **ops))


@torch.library.custom_op("olmo_hybrid::gdr_chunk_bwd", mutates_args=())
def gdr_chunk_bwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
                  cu_seqlens: Optional[Tensor], reset_mask: Optional[Tensor], use_l2norm: bool, gamma: Tensor,
                  tt: Tensor, p: Tensor, states: Tensor, vn: Tensor, do: Tensor, dht: Optional[Tensor], dot: str,
                  backward_dot: Optional[str], block_v: Optional[int], warps: int, stages: int,
                  backward_block_v: Optional[int], backward_warps: int, backward_stages: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    settings = KernelSettings(dot, backward_dot, block_v, warps, stages, backward_block_v, backward_warps,
                              backward_stages)
    return chunk_gdr_bwd(q, k, v, g, beta, scale, cu_seqlens, reset_mask, use_l2norm, gamma, tt, p, states, vn,
                         do, dht, settings)


@gdr_chunk_bwd.register_fake
def _(q, k, v, g, beta, scale, cu_seqlens, reset_mask, use_l2norm, gamma, tt, p, states, vn, do, dht, *_settings):
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    HV, V = v.shape[2:]
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), torch.empty(N, HV, q.shape[3], V, device=q.device, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, scale, initial_state, cu_seqlens, reset_mask, use_l2norm, save_states, *settings = inputs
    _, _, gamma, tt, p, states, vn = output
    if not save_states:
        raise RuntimeError("gdr_chunk_fwd was called without save_states=True but a gradient is required")
    ctx.save_for_backward(q, k, v, g, beta, cu_seqlens, reset_mask, gamma, tt, p, states, vn)
    # Unused outputs (the final state, the saved buffers) get None instead of zero-filled gradients, which for
    # the per-chunk states would be a memset as large as the states themselves.
    ctx.set_materialize_grads(False)
    ctx.scale, ctx.use_l2norm, ctx.settings = scale, use_l2norm, settings
    ctx.h0_dtype = None if initial_state is None else initial_state.dtype


def _backward(ctx, do, dht, *_):
    q, k, v, g, beta, cu_seqlens, reset_mask, gamma, tt, p, states, vn = ctx.saved_tensors
    if do is None:
        do = torch.zeros(*q.shape[:2], *v.shape[2:], device=q.device, dtype=q.dtype)
    dq, dk, dv, dg, dbeta, dh0 = gdr_chunk_bwd(q, k, v, g, beta, ctx.scale, cu_seqlens, reset_mask,
                                               ctx.use_l2norm, gamma, tt, p, states, vn, do, dht, *ctx.settings)
    dh0 = None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype)
    return (dq, dk, dv, dg, dbeta, None, dh0) + (None,) * (4 + len(ctx.settings))


gdr_chunk_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("olmo_hybrid::gdr_step", mutates_args=())
def gdr_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor, active: Optional[Tensor],
             scale: float, use_l2norm: bool) -> tuple[Tensor, Tensor]:
    new_state = torch.empty(state.shape, device=state.device, dtype=torch.float32)
    state = state if rows_contiguous(state) else state.contiguous()
    return step_forward(q, k, v, g, beta, state, new_state, active, scale, use_l2norm), new_state


@gdr_step.register_fake
def _(q, k, v, g, beta, state, active, scale, use_l2norm):
    return q.new_empty(*v.shape), torch.empty(state.shape, device=state.device, dtype=torch.float32)


@torch.library.custom_op("olmo_hybrid::gdr_step_", mutates_args=("state",))
def gdr_step_(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor, active: Optional[Tensor],
              scale: float, use_l2norm: bool) -> Tensor:
    return step_forward(q, k, v, g, beta, state, state, active, scale, use_l2norm)


@gdr_step_.register_fake
def _(q, k, v, g, beta, state, active, scale, use_l2norm):
    return q.new_empty(*v.shape)


# ------------------------------------------------------------------------------------------------------------
# Backend functions (signatures of the "torch" implementations in reference.py) and the arguments they refuse.


def triton_chunk_refusal(q, k, v, g, beta, **_) -> str | None:
    """Why the Triton chunk kernels cannot run these arguments, or None."""
    why = device_refusal(q) or dtype_refusal(q=q, k=k, v=v, g=g, beta=beta)
    if why is None and q.shape[-1] > 128:
        # The backward's fp32 operand tiles of 64 x K exceed the 227 KB of shared memory per block beyond K=128.
        why = f"key head dim K={q.shape[-1]} > 128 is not supported by the Triton chunk kernels yet"
    return why


def triton_step_refusal(q, k, v, g, beta, state, inplace=False, **_) -> str | None:
    """Why the Triton decode kernel cannot run these arguments, or None."""
    why = device_refusal(q) or dtype_refusal(q=q, k=k, v=v, g=g, beta=beta)
    if why is None and state.dtype != torch.float32:
        why = f"state has dtype {state.dtype}; the Triton decode kernel keeps float32 states"
    if why is None and inplace and not rows_contiguous(state):
        why = "the in-place Triton decode kernel needs each state row state[b] contiguous"
    return why


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def chunk_gated_delta_rule_triton(q, k, v, g, beta, scale, initial_state=None, output_final_state=False,
                                  cu_seqlens=None, use_qk_l2norm_in_kernel=False, reset_mask=None, *,
                                  settings: KernelSettings):
    """Chunked gated delta rule on the Triton kernels; arguments as ``olmo_hybrid.ops.gated_delta_rule``.

    cu_seqlens must run from 0 to T without decreasing; unlike the torch reference this path does not check it
    (that would cost a device sync per call)."""
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(q.device)
    if reset_mask is not None:
        reset_mask = reset_mask.to(q.device)
    save = _grad_needed(q, k, v, g, beta, initial_state)
    o, final_state, *_ = gdr_chunk_fwd(q, k, v, g, beta, float(scale), initial_state, cu_seqlens, reset_mask,
                                       bool(use_qk_l2norm_in_kernel), save, *settings_args(settings))
    return o, (final_state if output_final_state else None)


def gated_delta_rule_step_triton(q, k, v, g, beta, state, scale, use_qk_l2norm_in_kernel=False, inplace=False,
                                 active=None):
    """One decode token; arguments as ``olmo_hybrid.ops.gated_delta_rule_step``."""
    if inplace:
        return gdr_step_(q, k, v, g, beta, state, active, float(scale), bool(use_qk_l2norm_in_kernel)), state
    return gdr_step(q, k, v, g, beta, state, active, float(scale), bool(use_qk_l2norm_in_kernel))
