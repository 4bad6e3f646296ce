"""Pure-PyTorch short causal depthwise convolution (the q/k/v conv of a GDN layer), full sequence and step.

    y_t[c] = act( sum_{j=0}^{W-1} weight[c, j] * x_{t-(W-1)+j}[c] )

i.e. ``F.conv1d`` with ``groups=C`` and W-1 zeros of left padding (or the previous W-1 inputs, the conv state).
Math runs in float32 (float64 for float64 inputs); the output has x's dtype. These are the "torch" backend of the
public ops (``api.py`` validates the arguments and documents them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..varlen import cu_seqlens_offsets, pad_varlen, step_result, unpad_varlen


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


class _Taps(torch.autograd.Function):
    """y[:, t] = sum_j w[:, j] * keep[:, t, j] * xp[:, t + j], the W taps summed in order j = 0..W-1.

    xp [B, W-1+T, C] (context, then inputs), w [C, W], keep bool [B, T, W] or None (all taps kept). Written with
    its backward, which mirrors the forward tap by tap: autograd through W slices of xp would build a zero-filled
    full-size gradient per tap and add them up, about twice the memory traffic of the whole conv.
    """

    @staticmethod
    def forward(ctx, xp, w, keep):
        T = xp.shape[1] - w.shape[1] + 1
        y = None
        for j in range(w.shape[1]):
            tap = xp[:, j:j + T] if keep is None else xp[:, j:j + T] * keep[..., j, None]
            y = tap * w[:, j] if y is None else y.addcmul_(tap, w[:, j])
        ctx.save_for_backward(xp, w, keep)
        return y

    @staticmethod
    def backward(ctx, gy):
        xp, w, keep = ctx.saved_tensors
        T = gy.shape[1]
        gxp = torch.zeros_like(xp) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        for j in range(w.shape[1]):
            gj = gy if keep is None else gy * keep[..., j, None]
            if gxp is not None:
                gxp[:, j:j + T].addcmul_(gj, w[:, j])
            if gw is not None:
                gw[:, j] = (gj * xp[:, j:j + T]).sum((0, 1))
        return gxp, gw, None


def _conv_rows(x, weight, initial_state, reset, lengths):
    """Conv over rows x [B, T, C] (compute dtype); returns (pre-activation y, last W-1 inputs at ``lengths``)."""
    B, T, C = x.shape
    W = weight.shape[1]
    if initial_state is None:
        context = x.new_zeros(B, W - 1, C)
    else:
        context = initial_state.to(x.dtype).transpose(1, 2)
    xp = torch.cat([context, x], dim=1)  # [B, W-1+T, C]; position p holds input t = p-(W-1)
    keep = None
    if reset is not None:
        # Document index of each padded position; the context belongs to document 0 of the row. Tap j of token t
        # reads position t+j, kept only inside token t's document.
        seg = F.pad(reset.long().cumsum(1), (W - 1, 0))
        keep = seg.unfold(1, W, 1) == seg[:, W - 1:, None]  # [B, T, W]
    y = _Taps.apply(xp, weight, keep)
    idx = lengths[:, None] + torch.arange(W - 1, device=x.device)  # xp positions of the last W-1 inputs
    last = xp.gather(1, idx[..., None].expand(B, W - 1, C))
    if reset is not None and W > 1:  # inputs of an earlier document are not context for the next token
        last_seg = seg.gather(1, idx)
        last = last * (last_seg == seg.gather(1, lengths[:, None] + W - 2))[..., None]
    return y, last.transpose(1, 2)


def causal_conv1d_torch(x, weight, activation="silu", initial_state=None, output_final_state=False,
                        cu_seqlens=None, reset_mask=None):
    """Reference for ``olmo_hybrid.ops.causal_conv1d`` (weight already [C, W])."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    xc, w = x.to(dtype), weight.to(dtype)
    if cu_seqlens is not None:
        offsets = cu_seqlens_offsets(cu_seqlens, x.shape[1], "causal_conv1d")
        xc = pad_varlen(xc, offsets)
        if reset_mask is not None:
            reset_mask = pad_varlen(reset_mask, offsets)
        lengths = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])], device=x.device)
    else:
        lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
    y, last = _conv_rows(xc, w, initial_state, reset_mask, lengths)
    if cu_seqlens is not None:
        y = unpad_varlen(y, offsets)
    return _activate(y, activation).to(x.dtype), (last.to(x.dtype) if output_final_state else None)


def causal_conv1d_step_torch(x, conv_state, weight, activation="silu", inplace=False, active=None):
    """Reference for ``olmo_hybrid.ops.causal_conv1d_step`` (the specification of ``inplace`` and ``active``)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    window = torch.cat([conv_state.to(dtype), x.to(dtype)[..., None]], dim=-1)  # [B, C, W]
    y = _activate((window * weight.to(dtype)).sum(-1), activation).to(x.dtype)
    return step_result(y, window[..., 1:].to(conv_state.dtype), conv_state, active, inplace)
