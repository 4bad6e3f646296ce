"""torch.library custom ops around the Triton short-conv kernels, and the "triton" backend functions.

``olmo_hybrid::causal_conv1d_fwd`` / ``_bwd`` (autograd-registered) and ``olmo_hybrid::causal_conv1d_step``
(new state out of place) / ``olmo_hybrid::causal_conv1d_step_`` (in place, :func:`causal_conv1d_step_inplace`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .conv import conv_bounds, conv_bwd, conv_final_state, conv_fwd, conv_step
from .gdn import _device_ok

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
def causal_conv1d_step_op(x: Tensor, conv_state: Tensor, weight: Tensor, silu: bool) -> tuple[Tensor, Tensor]:
    new_state = torch.empty_like(conv_state)
    return conv_step(x, conv_state.contiguous(), new_state, weight, silu), new_state


@causal_conv1d_step_op.register_fake
def _(x, conv_state, weight, silu):
    return torch.empty_like(x), torch.empty_like(conv_state)


@torch.library.custom_op("olmo_hybrid::causal_conv1d_step_", mutates_args=("conv_state",))
def causal_conv1d_step_inplace_op(x: Tensor, conv_state: Tensor, weight: Tensor, silu: bool) -> Tensor:
    return conv_step(x, conv_state, conv_state, weight, silu)


@causal_conv1d_step_inplace_op.register_fake
def _(x, conv_state, weight, silu):
    return torch.empty_like(x)


def supports_conv(x, weight, **_) -> str | None:
    if not _device_ok(x):
        return f"Triton kernels need CUDA tensors, got {x.device.type}"
    if x.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        return f"x/weight have dtypes {x.dtype}/{weight.dtype}; the Triton kernels take float32, bfloat16, float16"
    if weight.shape[1] < 2:
        return "the Triton conv kernels need a window W >= 2"
    return None


def supports_conv_step(x, conv_state, weight, **kwargs) -> str | None:
    if conv_state.dtype not in _FLOAT_DTYPES:
        return f"conv_state has dtype {conv_state.dtype}; the Triton kernels take float32, bfloat16, float16"
    return supports_conv(x, weight)


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


def causal_conv1d_step_triton(x, conv_state, weight, activation="silu"):
    """One decode token; ``conv_state`` is left unchanged (see :func:`causal_conv1d_step_inplace`)."""
    return causal_conv1d_step_op(x, conv_state, weight, _is_silu(activation))


def causal_conv1d_step_inplace(x, conv_state, weight, activation="silu"):
    """One decode token updating ``conv_state`` [B, C, W-1] in place; returns y [B, C]. weight is [C, W]."""
    if not conv_state.is_contiguous():
        raise ValueError("conv_state must be contiguous for the in-place update")
    if weight.dim() == 3:
        weight = weight[:, 0]
    return causal_conv1d_step_inplace_op(x, conv_state, weight, _is_silu(activation))
