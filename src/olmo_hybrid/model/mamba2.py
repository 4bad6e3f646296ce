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
forward). The in-place updates of ``conv_state`` / ``ssm_state`` mirror the GDN layer's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from olmo_hybrid import ops


class GroupGatedRMSNorm(nn.Module):
    """transformers' ``MambaRMSNormGated`` with ``norm_before_gate=False``: RMSNorm of x * silu(gate) over groups
    of ``group_size`` channels, times a per-channel weight; computed in float32."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
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
                 norm_eps: float = 1e-5, time_step_limit: tuple[float, float] = (0.0, math.inf)):
        super().__init__()
        if num_heads % n_groups:
            raise ValueError(f"num_heads={num_heads} must be a multiple of n_groups={n_groups}")
        self.num_heads, self.head_dim, self.state_size, self.n_groups = num_heads, head_dim, state_size, n_groups
        self.intermediate_size = num_heads * head_dim
        self.conv_dim = self.intermediate_size + 2 * n_groups * state_size
        self.time_step_limit = (float(time_step_limit[0]), float(time_step_limit[1]))
        self.in_proj = nn.Linear(d_model, self.intermediate_size + self.conv_dim + num_heads, bias=use_bias)
        # nn.Conv1d as the container of transformers' conv1d.weight [C, 1, W] and conv1d.bias [C]; the causal
        # conv itself (with document resets and a decode state) is ops.causal_conv1d.
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim,
                                bias=use_conv_bias, padding=conv_kernel - 1)
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.D = nn.Parameter(torch.empty(num_heads))
        self.norm = GroupGatedRMSNorm(self.intermediate_size, self.intermediate_size // n_groups, norm_eps)
        self.out_proj = nn.Linear(self.intermediate_size, d_model, bias=use_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, generator: torch.Generator | None = None, a_range=(1.0, 16.0),
                             dt_range=(1e-3, 0.1), dt_floor=1e-4) -> None:
        """mamba_ssm's Mamba2 init: A ~ U(1, 16) stored as log A, D = 1, dt log-uniform in dt_range (floored),
        stored as softplus^-1(dt)."""
        u = torch.rand(self.num_heads, generator=generator)
        self.A_log.copy_(torch.log(a_range[0] + u * (a_range[1] - a_range[0])))
        self.D.fill_(1.0)
        u = torch.rand(self.num_heads, generator=generator)
        dt = torch.exp(u * (math.log(dt_range[1]) - math.log(dt_range[0])) + math.log(dt_range[0]))
        dt = dt.clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _conv(self, xbc, reset_mask, conv_state):
        """silu(conv1d(xBC) + bias) [B, T, C]; updates ``conv_state`` [B, C, W-1] in place when given."""
        if conv_state is not None and xbc.shape[1] == 1 and (reset_mask is None or not reset_mask.any()):
            y, _ = ops.causal_conv1d_step(xbc[:, 0], conv_state, self.conv1d.weight, activation=None, inplace=True)
            y = y[:, None]
        else:
            y, new_state = ops.causal_conv1d(xbc, self.conv1d.weight, activation=None, initial_state=conv_state,
                                             output_final_state=conv_state is not None, reset_mask=reset_mask)
            if conv_state is not None:
                conv_state.copy_(new_state)
        if self.conv1d.bias is not None:
            y = y + self.conv1d.bias.to(y.dtype)
        return F.silu(y)

    def forward(self, x: torch.Tensor, reset_mask: torch.Tensor | None = None,
                conv_state: torch.Tensor | None = None, ssm_state: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]. reset_mask [B, T] bool: True where a document starts (state
        and conv context cleared first). conv_state [B, conv_dim, W-1] and ssm_state [B, H, P, N] (float32),
        given together for prefill/decode, continue from and are updated in place."""
        b, t, _ = x.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.state_size
        gate, xbc, dt = self.in_proj(x).split([self.intermediate_size, self.conv_dim, H], dim=-1)
        xbc = self._conv(xbc, reset_mask, conv_state)
        xs, B, C = xbc.split([self.intermediate_size, G * N, G * N], dim=-1)
        # dt and A in float32: released checkpoints store dt_bias and A_log in bf16.
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if self.time_step_limit != (0.0, math.inf):
            dt = dt.clamp(*self.time_step_limit)
        A = -self.A_log.float().exp()
        xs, B, C = xs.view(b, t, H, P), B.view(b, t, G, N), C.view(b, t, G, N)
        if ssm_state is None:
            y, _ = ops.ssd(xs, dt, A, B, C, self.D, reset_mask=reset_mask)
        elif t == 1 and (reset_mask is None or not reset_mask.any()):
            y, _ = ops.ssd_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], ssm_state, self.D, inplace=True)
            y = y[:, None]
        else:
            y, state = ops.ssd(xs, dt, A, B, C, self.D, initial_state=ssm_state, output_final_state=True,
                               reset_mask=reset_mask)
            ssm_state.copy_(state)
        y = self.norm(y.reshape(b, t, self.intermediate_size), gate)
        return self.out_proj(y.to(x.dtype))

    def state_shapes(self, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (conv_state, ssm_state) for ``batch`` rows; the ssm state is float32."""
        return (batch, self.conv_dim, self.conv1d.kernel_size[0] - 1), (batch, self.num_heads, self.head_dim,
                                                                        self.state_size)
