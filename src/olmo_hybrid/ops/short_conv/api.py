"""The short causal depthwise convolution's public ops (a GDN layer's q/k/v conv): argument checks,
documentation and the call into the chosen backend (``olmo_hybrid/ops/dispatch.py``).

Document boundaries (``cu_seqlens``, ``reset_mask``) mean what they mean for the gated delta rule
(``olmo_hybrid/ops/varlen.py``); here the state is the conv context, the W-1 inputs before a token.
"""

from __future__ import annotations

import torch

from ..checks import check_active, check_boundaries, check_float, check_shape
from ..dispatch import select


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
                  reset_mask=None, *, backend=None):
    """Short causal depthwise convolution. Returns ``(y, final_state)``.

    x: [B, T, C]. weight: [C, W] (or [C, 1, W]); y_t = act(sum_j weight[:, j] * x_{t-(W-1)+j}).
    initial_state: [N, C, W-1], the W-1 inputs before the first token (oldest first); None means zeros.
    final_state (if output_final_state): [N, C, W-1] in x's dtype, the last W-1 inputs of each sequence/row
    (earlier positions taken from initial_state, or zero, when it is shorter than W-1 or when the row's last
    document is shorter than W-1 with reset_mask). cu_seqlens / reset_mask: see the module docstring; a document
    never sees inputs of another one. activation: "silu" (= "swish") or None. y has x's dtype.
    backend: "auto" | "torch" | "triton", or None for the enclosing ``ops.use_backend`` (else "auto").
    """
    op = "causal_conv1d"
    check_float(op, x=x, weight=weight)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must have shape [B, T, C], got {list(x.shape)}")
    B, T, C = x.shape
    weight = _conv_weight(op, weight, C)
    _check_activation(op, activation)
    N = check_boundaries(op, B, T, cu_seqlens, reset_mask)
    if initial_state is not None:
        check_float(op, initial_state=initial_state)
        check_shape(op, "initial_state", initial_state, (N, C, weight.shape[1] - 1), "[N, C, W-1]")
    args = dict(x=x, weight=weight, activation=activation, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, reset_mask=reset_mask)
    return select(op, backend, x.device, args)(**args)


def causal_conv1d_step(x, conv_state, weight, activation="silu", *, inplace=False, active=None, backend=None):
    """One decode token of :func:`causal_conv1d`. Returns ``(y, conv_state_out)``.

    x: [B, C]. conv_state: [B, C, W-1], the previous W-1 inputs (oldest first), e.g. rows ``pool[i:j]`` of a
    larger pool. y: [B, C] in x's dtype. The new state is conv_state shifted left by one with x appended, in
    conv_state's dtype: a new tensor (conv_state unchanged) for inplace=False, written into conv_state and
    returned for inplace=True.
    active: bool [B] on conv_state's device, or None for all rows. Rows where it is False keep their state bit
    for bit (copied through when not in place); their outputs are zeros. Read on the device: no host sync.
    """
    op = "causal_conv1d_step"
    check_float(op, x=x, conv_state=conv_state, weight=weight)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must have shape [B, C], got {list(x.shape)}")
    B, C = x.shape
    weight = _conv_weight(op, weight, C)
    _check_activation(op, activation)
    check_shape(op, "conv_state", conv_state, (B, C, weight.shape[1] - 1), "[B, C, W-1]")
    check_active(op, active, B, conv_state.device)
    args = dict(x=x, conv_state=conv_state, weight=weight, activation=activation, inplace=bool(inplace),
                active=active)
    return select(op, backend, x.device, args)(**args)
