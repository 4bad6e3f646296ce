"""torch.library custom ops around the Triton SSD kernels, and the "triton" backend functions of the SSD ops.

The ops are opaque to torch.compile (traced through their fake implementations, so a model using them compiles
without graph breaks) and carry their own autograd formula:

- ``olmo_hybrid::ssd_chunk_fwd`` / ``olmo_hybrid::ssd_chunk_bwd``: chunked forward (its per-chunk states are
  saved for the backward) and backward (``chunk_fwd.py``, ``chunk_bwd.py``). The dot precision of
  ``KernelSettings`` travels as the arguments ``dot`` and ``backward_dot``.
- ``olmo_hybrid::ssd_step_``: one decode token, updating the float32 state in place (``step_kernel.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from olmo_hybrid.config import KernelSettings
from ..triton_runtime import device_refusal, dtype_refusal, rows_contiguous
from .chunk_bwd import chunk_ssd_bwd
from ..gated_delta_rule.chunk_common import CHUNK, operand_dtype
from .chunk_fwd import chunk_ssd_fwd, dot_precision
from .step_kernel import step_inplace

MAX_STATE = 128


def _n_chunks_max(B: int, T: int, cu_seqlens: Optional[Tensor]) -> int:
    # Must agree with gated_delta_rule/chunk_common.chunk_tables (the fake implementations need the same shapes).
    if cu_seqlens is None:
        return B * (-(-T // CHUNK))
    return T // CHUNK + cu_seqlens.numel() - 1


@torch.library.custom_op("olmo_hybrid::ssd_chunk_fwd", mutates_args=())
def ssd_chunk_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  initial_state: Optional[Tensor], cu_seqlens: Optional[Tensor], reset_mask: Optional[Tensor],
                  dot: str, backward_dot: str) -> tuple[Tensor, Tensor, Tensor]:
    return chunk_ssd_fwd(x, dt, A, B, C, D, initial_state, cu_seqlens, reset_mask, dot)


@ssd_chunk_fwd.register_fake
def _(x, dt, A, B, C, D, initial_state, cu_seqlens, reset_mask, dot, backward_dot):
    Bsz, T, H, P = x.shape
    N = B.shape[3]
    rows = Bsz if cu_seqlens is None else cu_seqlens.shape[0] - 1
    states_dtype = operand_dtype(dot_precision(dot, x, B, C))
    return (torch.empty_like(x), torch.empty(rows, H, P, N, device=x.device, dtype=torch.float32),
            torch.empty(_n_chunks_max(Bsz, T, cu_seqlens), H, N, P, device=x.device, dtype=states_dtype))


@torch.library.custom_op("olmo_hybrid::ssd_chunk_bwd", mutates_args=())
def ssd_chunk_bwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  cu_seqlens: Optional[Tensor], reset_mask: Optional[Tensor], states: Tensor, dy: Tensor,
                  dht: Optional[Tensor], dot: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return chunk_ssd_bwd(x, dt, A, B, C, D, cu_seqlens, reset_mask, states, dy, dht, dot)


@ssd_chunk_bwd.register_fake
def _(x, dt, A, B, C, D, cu_seqlens, reset_mask, states, dy, dht, dot):
    rows = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    H, P = x.shape[2:]
    return (torch.empty_like(x), torch.empty_like(dt), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), torch.empty(H, device=x.device, dtype=torch.float32),
            torch.empty(rows, H, P, B.shape[3], device=x.device, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, initial_state, cu_seqlens, reset_mask, dot, backward_dot = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, cu_seqlens, reset_mask, output[2])
    # The unused outputs (the final state, the per-chunk states) get None instead of zero-filled gradients.
    ctx.set_materialize_grads(False)
    ctx.h0_dtype = None if initial_state is None else initial_state.dtype
    ctx.backward_dot = backward_dot


def _backward(ctx, dy, dht, _):
    x, dt, A, B, C, D, cu_seqlens, reset_mask, states = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dx, ddt, dA, dB, dC, dD, dh0 = ssd_chunk_bwd(x, dt, A, B, C, D, cu_seqlens, reset_mask, states, dy, dht,
                                                 ctx.backward_dot)
    dh0 = None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype)
    dD = None if D is None else dD.to(D.dtype)
    return dx, ddt, dA, dB, dC, dD, dh0, None, None, None, None


ssd_chunk_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("olmo_hybrid::ssd_step_", mutates_args=("state",))
def ssd_step_(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], state: Tensor,
              active: Optional[Tensor]) -> Tensor:
    return step_inplace(x, dt, A, B, C, D, state, active.view(torch.uint8) if active is not None else None)


@ssd_step_.register_fake
def _(x, dt, A, B, C, D, state, active):
    return torch.empty_like(x)


# ------------------------------------------------------------------------------------------------------------
# Backend functions (signatures of the torch implementations in reference.py) and the arguments they refuse.


def triton_ssd_refusal(x, dt, A, B, C, D=None, initial_state=None, settings=None, **_) -> str | None:
    """Why the Triton chunk kernels cannot run these arguments, or None."""
    why = device_refusal(x) or dtype_refusal(x=x, dt=dt, A=A, B=B, C=C)
    if why is None and D is not None:
        why = dtype_refusal(D=D)
    if why is None and B.shape[-1] > MAX_STATE:
        why = f"state size N={B.shape[-1]} > {MAX_STATE} is not supported by the Triton SSD kernels"
    for name in ("dot", "dot_backward"):
        value = getattr(settings, name)
        if why is None and value != "bf16" and torch.promote_types(x.dtype, B.dtype) != torch.float32:
            why = (f"KernelSettings.{name}={value!r} is not implemented by the SSD kernels (bf16 operands for "
                   "16-bit inputs only)")
    return why


def triton_ssd_step_refusal(x, dt, A, B, C, state, D=None, inplace=False, **_) -> str | None:
    """Why the Triton decode kernel cannot run these arguments, or None."""
    why = device_refusal(x) or dtype_refusal(x=x, dt=dt, A=A, B=B, C=C)
    if why is None and D is not None:
        why = dtype_refusal(D=D)
    if why is None and state.dtype != torch.float32:
        why = f"state has dtype {state.dtype}; the Triton decode kernel keeps float32 states"
    if why is None and inplace and not rows_contiguous(state):
        why = "the in-place Triton decode kernel needs each state row state[b] contiguous"
    return why


def ssd_triton(x, dt, A, B, C, D=None, initial_state=None, output_final_state=False, cu_seqlens=None,
               reset_mask=None, *, settings: KernelSettings):
    """Chunked SSD on the Triton kernels; arguments as ``olmo_hybrid.ops.ssd``. cu_seqlens must run from 0 to T
    without decreasing; unlike the torch reference this path does not check it (a device sync per call)."""
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(x.device)
    if reset_mask is not None:
        reset_mask = reset_mask.to(x.device)
    y, final_state, _ = ssd_chunk_fwd(x, dt, A, B, C, D, initial_state, cu_seqlens, reset_mask, settings.dot,
                                      settings.dot_backward)
    return y, (final_state if output_final_state else None)


def ssd_step_triton(x, dt, A, B, C, state, D=None, inplace=False, active=None):
    """One decode token; arguments as ``olmo_hybrid.ops.ssd_step``."""
    if not inplace:
        state = state.clone(memory_format=torch.contiguous_format)
    return ssd_step_(x, dt, A, B, C, D, state, active), state
