"""Mamba2 mixer (``mixer``): transformers' ``Mamba2Mixer`` parameter names, shapes and semantics, so Mamba2
weights load by copy.

    zxbcdt = in_proj(x) = [z (gate, I) | xBC (I + 2 G N) | dt (H)]
    xBC = silu(conv1d(xBC) + bias)          depthwise causal conv of width W over the channels of x, B and C
    x, B, C = split(xBC);  dt = clamp(softplus(dt + dt_bias), *time_step_limit);  A = -exp(A_log)
    y = SSD(x, dt, A, B, C) + D x           per head, state S [P, N]: S <- exp(dt A) S + dt x B^T; y = S C
    out = out_proj(norm(y, z))              norm: RMSNorm over groups of I / G channels of y * silu(z)

I = num_heads * head_dim (transformers: expand * hidden_size), N = state_size, G = n_groups (B and C are shared
by the H / G heads of a group). The scan is ``olmo_hybrid.ops.ssd``. Differences from transformers'
``torch_forward``, by design: the gated norm multiplies its weight in float32 before casting back (transformers
casts first; identical in float32), and decoding applies ``time_step_limit`` as the full forward does
(transformers' single-token path skips the clamp, so with a non-default limit its decode differs from its own
forward). With a cache, prefill runs the chunked ops from the cached state and stores the final one; decode runs
the one-token step ops, which update the cached conv and SSM states in place, only in the active rows (as the
GDN layer does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from olmo_hybrid import ops
from olmo_hybrid.config import KernelSettings, ModelConfig
from olmo_hybrid.model.cache import Mamba2LayerState
from olmo_hybrid.model.context import ForwardContext
from olmo_hybrid.model.layers import ShortConv

NORM_EPS = 1e-5  # the gated norm's eps: transformers' Mamba2Config.layer_norm_epsilon and mamba_ssm's default


class GroupGatedRMSNorm(nn.Module):
    """transformers' ``MambaRMSNormGated`` with ``norm_before_gate=False``: RMSNorm of x * silu(gate) over groups
    of ``group_size`` channels, times a per-channel weight; computed in float32."""

    def __init__(self, dim: int, group_size: int, eps: float = NORM_EPS):
        super().__init__()
        if dim % group_size:
            raise ValueError(f"norm width {dim} is not a multiple of its group size {group_size}")
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float() * F.silu(gate.float())
        h = h.unflatten(-1, (-1, self.group_size))
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (h * self.weight.float()).to(dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, head_dim: int, state_size: int = 128, n_groups: int = 1,
                 conv_kernel: int = 4, *, use_bias: bool = False, use_conv_bias: bool = True,
                 norm_eps: float = NORM_EPS, time_step_limit: tuple[float, float] = (0.0, math.inf),
                 kernel_settings: KernelSettings | None = None):
        super().__init__()
        self.kernel_settings = kernel_settings  # None: the ops' defaults
        if num_heads % n_groups:
            raise ValueError(f"num_heads={num_heads} must be a multiple of n_groups={n_groups}")
        self.num_heads, self.head_dim, self.state_size, self.n_groups = num_heads, head_dim, state_size, n_groups
        self.intermediate_size = num_heads * head_dim
        self.conv_dim = self.intermediate_size + 2 * n_groups * state_size
        self.time_step_limit = (float(time_step_limit[0]), float(time_step_limit[1]))
        self.in_proj = nn.Linear(d_model, self.intermediate_size + self.conv_dim + num_heads, bias=use_bias)
        self.conv1d = ShortConv(self.conv_dim, conv_kernel, bias=use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.D = nn.Parameter(torch.empty(num_heads))
        self.norm = GroupGatedRMSNorm(self.intermediate_size, self.intermediate_size // n_groups, norm_eps)
        self.out_proj = nn.Linear(self.intermediate_size, d_model, bias=use_bias)

    @classmethod
    def from_config(cls, c: ModelConfig) -> "Mamba2Mixer":
        return cls(c.d_model, c.mamba_heads, c.mamba_head_dim, c.mamba_state_size, c.mamba_n_groups,
                   c.mamba_conv_size, use_bias=c.mamba_proj_bias, use_conv_bias=c.mamba_conv_bias,
                   kernel_settings=c.kernels)

    @torch.no_grad()
    def reset_ssm_parameters(self, generator: torch.Generator | None = None, a_range=(1.0, 16.0),
                             dt_range=(1e-3, 0.1), dt_floor=1e-4) -> None:
        """mamba_ssm's Mamba2 init: A ~ U(1, 16) stored as log A, D = 1, dt log-uniform in dt_range (floored),
        stored as softplus^-1(dt); the conv as PyTorch's default (uniform, bound W^-1/2)."""
        u = torch.rand(self.num_heads, generator=generator)
        self.A_log.copy_(torch.log(a_range[0] + u * (a_range[1] - a_range[0])))
        self.D.fill_(1.0)
        u = torch.rand(self.num_heads, generator=generator)
        dt = torch.exp(u * (math.log(dt_range[1]) - math.log(dt_range[0])) + math.log(dt_range[0]))
        dt = dt.clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        bound = self.conv1d.weight.shape[-1] ** -0.5
        for p in (self.conv1d.weight, self.conv1d.bias):
            if p is not None:
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))

    def forward(self, x: torch.Tensor, ctx: ForwardContext, state: Mamba2LayerState | None = None) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]; ``state`` (cache rows) continues sequences and is updated."""
        b, t, _ = x.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.state_size
        gate, xbc, dt = self.in_proj(x).split([self.intermediate_size, self.conv_dim, H], dim=-1)
        xbc = self.conv1d(xbc, ctx, state.conv if state is not None else None)
        xs, B, C = xbc.split([self.intermediate_size, G * N, G * N], dim=-1)
        # dt and A in float32: released checkpoints store dt_bias and A_log in bf16.
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if self.time_step_limit != (0.0, math.inf):
            dt = dt.clamp(*self.time_step_limit)
        A = -self.A_log.float().exp()
        xs, B, C = xs.view(b, t, H, P), B.view(b, t, G, N), C.view(b, t, G, N)
        if state is None:
            y, _ = ops.ssd(xs, dt, A, B, C, self.D, reset_mask=ctx.reset_mask, settings=self.kernel_settings)
        elif ctx.decoding:
            y, _ = ops.ssd_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state.ssm, self.D, inplace=True,
                                active=ctx.active, settings=self.kernel_settings)
            y = y[:, None]
        else:
            y, final = ops.ssd(xs, dt, A, B, C, self.D, initial_state=state.ssm if ctx.start else None,
                               output_final_state=True, settings=self.kernel_settings)
            state.ssm.copy_(final)
        y = self.norm(y.reshape(b, t, self.intermediate_size), gate)
        return self.out_proj(y.to(x.dtype))
