"""Small building blocks shared by the block types: RMSNorm, gated RMSNorm, SwiGLU MLP, the short causal conv."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from olmo_hybrid import ops
from olmo_hybrid.model.context import ForwardContext


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as OLMo-core's ``full_precision`` norm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm of the GDN output, then multiplied by silu(gate); weight shared across heads.

    The eps (1e-5) is fixed by the released model, not a config field. Computed entirely in fp32 (fla's
    fused kernel does the same); transformers' eager path rounds once more in bf16, which matters only
    in bf16.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return (x * F.silu(gate.float())).to(dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ShortConvOp(nn.Module):
    """``ops.causal_conv1d`` over whole sequences: ``(y, final_state)``. Holds no tensors, so replacing it
    (``olmo_hybrid.train.context_parallel``) leaves state dicts unchanged."""

    def __init__(self, activation: str | None = "silu"):
        super().__init__()
        self.activation = activation

    def forward(self, x, weight, reset_mask=None, initial_state=None, output_final_state=False):
        return ops.causal_conv1d(x, weight, activation=self.activation, initial_state=initial_state,
                                 output_final_state=output_final_state, reset_mask=reset_mask)


class ShortConv(nn.Module):
    """Depthwise causal conv, weight stored as ``[C, 1, W]`` (the checkpoints' layout), then SiLU; with ``bias``
    (Mamba2's ``conv1d.bias``) the bias is added before the SiLU."""

    def __init__(self, channels: int, width: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.conv_op = ShortConvOp("silu" if self.bias is None else None)  # with a bias, SiLU comes after it

    def forward(self, x: torch.Tensor, ctx: ForwardContext, state: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C] -> silu(conv(x) + bias); with a cache ``state`` [B, C, W-1], continues from it and updates
        it (decode: in place, active rows only)."""
        w = self.weight[:, 0, :]
        if state is None:
            y = self.conv_op(x, w, reset_mask=ctx.reset_mask)[0]
        elif ctx.decoding:
            y, _ = ops.causal_conv1d_step(x[:, 0], state, w, activation=self.conv_op.activation, inplace=True,
                                          active=ctx.active)
            y = y[:, None]
        else:
            y, final = self.conv_op(x, w, initial_state=state if ctx.start else None, output_final_state=True)
            state.copy_(final)
        return y if self.bias is None else F.silu(y + self.bias.to(y.dtype))
