"""torch.library custom ops around the Triton short-conv kernels (``kernels.py``), and the "triton" backend
functions.

``olmo_hybrid::causal_conv1d_fwd`` / ``_bwd`` (autograd-registered) and ``olmo_hybrid::causal_conv1d_step``
(new state out of place) / ``olmo_hybrid::causal_conv1d_step_`` (in place).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..triton_runtime import device_refusal, dtype_refusal, rows_contiguous
from .kernels import conv_bounds, conv_bwd, conv_final_state, conv_fwd, conv_step


@torch.library.custom_op("olmo_hybrid::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(x: Tensor, weight: Tensor, initial_state: Optional[Tensor], doc_start: Optional[Tensor],
                      init_row: Optional[Tensor], silu: bool) -> Tensor:
    return conv_fwd(x, weight, initial_state, doc_start, init_row, silu)


@causal_conv1d_fwd.register_fake
def _(x, weight, initial_state, doc_start, init_row, silu):
    return torch.empty_like(x)


@torch.library.custom_op("olmo_hybrid::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(x: Tensor, weight: Tensor, initial_state: Optional[Tensor], doc_start: Optional[Tensor],
                      init_row: Optional[Tensor], silu: bool, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return conv_bwd(x, weight, initial_state, doc_start, init_row, silu, dy)


@causal_conv1d_bwd.register_fake
def _(x, weight, initial_state, doc_start, init_row, silu, dy):
    dh0 = torch.empty_like(initial_state) if initial_state is not None else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), dh0


def _setup_context(ctx, inputs, output):
    x, weight, initial_state, doc_start, init_row, silu = inputs
    ctx.save_for_backward(x, weight, initial_state, doc_start, init_row)
    ctx.silu = silu


def _backward(ctx, dy):
    x, weight, initial_state, doc_start, init_row = ctx.saved_tensors
    dx, dw, dh0 = causal_conv1d_bwd(x, weight, initial_state, doc_start, init_row, ctx.silu, dy)
    return dx, dw, (dh0 if initial_state is not None else None), None, None, None


causal_conv1d_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("olmo_hybrid::causal_conv1d_step", mutates_args=())
def causal_conv1d_step_op(x: Tensor, conv_state: Tensor, weight: Tensor, active: Optional[Tensor],
                          silu: bool) -> tuple[Tensor, Tensor]:
    new_state = conv_state.new_empty(conv_state.shape)
    conv_state = conv_state if rows_contiguous(conv_state) else conv_state.contiguous()
    return conv_step(x, conv_state, new_state, weight, active, silu), new_state


@causal_conv1d_step_op.register_fake
def _(x, conv_state, weight, active, silu):
    return torch.empty_like(x), conv_state.new_empty(conv_state.shape)


@torch.library.custom_op("olmo_hybrid::causal_conv1d_step_", mutates_args=("conv_state",))
def causal_conv1d_step_inplace_op(x: Tensor, conv_state: Tensor, weight: Tensor, active: Optional[Tensor],
                                  silu: bool) -> Tensor:
    return conv_step(x, conv_state, conv_state, weight, active, silu)


@causal_conv1d_step_inplace_op.register_fake
def _(x, conv_state, weight, active, silu):
    return torch.empty_like(x)


def triton_conv_refusal(x, weight, **_) -> str | None:
    """Why the Triton conv kernels cannot run these arguments, or None."""
    why = device_refusal(x) or dtype_refusal(x=x, weight=weight)
    if why is None and weight.shape[1] < 2:
        why = "the Triton conv kernels need a window W >= 2"
    return why


def triton_conv_step_refusal(x, conv_state, weight, inplace=False, **_) -> str | None:
    """Why the Triton conv step kernel cannot run these arguments, or None."""
    why = dtype_refusal(conv_state=conv_state) or triton_conv_refusal(x, weight)
    if why is None and inplace and not rows_contiguous(conv_state):
        why = "the in-place Triton conv step needs each state row conv_state[b] contiguous"
    return why


def _is_silu(activation) -> bool:
    return activation in ("silu", "swish")


def causal_conv1d_triton(x, weight, activation="silu", initial_state=None, output_final_state=False,
                         cu_seqlens=None, reset_mask=None):
    """Short causal conv on the Triton kernels; arguments as ``olmo_hybrid.ops.causal_conv1d``."""
    B, T, _ = x.shape
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(x.device)
    if reset_mask is not None:
        reset_mask = reset_mask.to(x.device)
    doc_start, init_row = conv_bounds(B, T, cu_seqlens, reset_mask, x.device)
    y = causal_conv1d_fwd(x, weight, initial_state, doc_start, init_row, _is_silu(activation))
    final_state = None
    if output_final_state:
        final_state = conv_final_state(x, initial_state, weight.shape[1], B, T, cu_seqlens, reset_mask)
    return y, final_state


def causal_conv1d_step_triton(x, conv_state, weight, activation="silu", inplace=False, active=None):
    """One decode token; arguments as ``olmo_hybrid.ops.causal_conv1d_step`` (weight already [C, W])."""
    if inplace:
        return causal_conv1d_step_inplace_op(x, conv_state, weight, active, _is_silu(activation)), conv_state
    return causal_conv1d_step_op(x, conv_state, weight, active, _is_silu(activation))
