"""Gated DeltaNet mixer (``linear_attn``), as in OLMo Hybrid.

Per head, with a fixed-size state S [K, V]:  S <- exp(g) S;  S <- S + k (beta (v - S^T k))^T;  o = S^T q.
q, k, v each go through their own short causal depthwise conv + SiLU; q and k are L2-normalised inside
the op; beta = 2 sigmoid(b) when negative eigenvalues are allowed; the output is a per-head gated RMSNorm.
With a cache, prefill runs the chunked ops from the cached state and stores the final state; decode runs the
one-token step ops, which update the cached states in place, only in the active rows. The whole-sequence op calls
(no cache, and prefill) go through tensor-free modules, ``layers.ShortConvOp`` and :class:`DeltaRuleOp`, that a
wrapper can replace from outside (context parallelism does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from olmo_hybrid import ops
from olmo_hybrid.config import KernelSettings, ModelConfig
from olmo_hybrid.model.cache import GDNLayerState
from olmo_hybrid.model.context import ForwardContext
from olmo_hybrid.model.layers import GatedRMSNorm, ShortConv


class DeltaRuleOp(nn.Module):
    """``ops.gated_delta_rule`` with the model's in-kernel q/k L2 norm and kernel settings over whole sequences:
    ``(o, final_state)``. Holds no tensors, so replacing it (``olmo_hybrid.train.context_parallel``) leaves state
    dicts unchanged."""

    def __init__(self, settings: KernelSettings):
        super().__init__()
        self.settings = settings

    def forward(self, q, k, v, g, beta, reset_mask=None, initial_state=None, output_final_state=False):
        return ops.gated_delta_rule(q, k, v, g, beta, initial_state=initial_state,
                                    output_final_state=output_final_state, use_qk_l2norm_in_kernel=True,
                                    reset_mask=reset_mask, settings=self.settings)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.heads, self.v_heads = c.gdn_heads, c.gdn_v_heads
        self.head_k, self.head_v = c.gdn_head_k, c.gdn_head_v
        self.allow_neg_eigval = c.gdn_allow_neg_eigval
        key_dim, value_dim = self.heads * self.head_k, self.v_heads * self.head_v
        self.q_proj = nn.Linear(c.d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, value_dim, bias=False)
        self.a_proj = nn.Linear(c.d_model, self.v_heads, bias=False)
        self.b_proj = nn.Linear(c.d_model, self.v_heads, bias=False)
        self.g_proj = nn.Linear(c.d_model, value_dim, bias=False)
        self.o_proj = nn.Linear(value_dim, c.d_model, bias=False)
        self.q_conv1d = ShortConv(key_dim, c.gdn_conv_size)
        self.k_conv1d = ShortConv(key_dim, c.gdn_conv_size)
        self.v_conv1d = ShortConv(value_dim, c.gdn_conv_size)
        self.o_norm = GatedRMSNorm(self.head_v, eps=1e-5)
        self.A_log = nn.Parameter(torch.empty(self.v_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.v_heads))
        self.kernel_settings = c.kernels
        self.delta_rule_op = DeltaRuleOp(c.kernels)

    @torch.no_grad()
    def reset_gate_parameters(self, generator: torch.Generator | None = None,
                              a_range=(0.0, 16.0), dt_range=(1e-3, 0.1), dt_floor=1e-4) -> None:
        """fla / transformers init: A ~ U(0, 16) stored as log A; dt log-uniform, stored as softplus^-1(dt)."""
        u = torch.rand(self.v_heads, generator=generator)
        self.A_log.copy_(torch.log((a_range[0] + u * (a_range[1] - a_range[0])).clamp(min=1e-4)))
        u = torch.rand(self.v_heads, generator=generator)
        dt = torch.exp(u * (math.log(dt_range[1]) - math.log(dt_range[0])) + math.log(dt_range[0]))
        dt = dt.clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor, ctx: ForwardContext, state: GDNLayerState | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_conv1d(self.q_proj(x), ctx, state.conv_q if state is not None else None)
        k = self.k_conv1d(self.k_proj(x), ctx, state.conv_k if state is not None else None)
        v = self.v_conv1d(self.v_proj(x), ctx, state.conv_v if state is not None else None)
        q = q.view(b, t, self.heads, self.head_k)
        k = k.view(b, t, self.heads, self.head_k)
        v = v.view(b, t, self.v_heads, self.head_v)
        beta = self.b_proj(x).sigmoid()
        if self.allow_neg_eigval:
            beta = beta * 2.0
        # Gates in fp32: A_log and dt_bias are stored in bf16 in released checkpoints.
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())

        if state is None:
            o, _ = self.delta_rule_op(q, k, v, g, beta, reset_mask=ctx.reset_mask)
        elif ctx.decoding:
            o, _ = ops.gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state.recurrent,
                                             use_qk_l2norm_in_kernel=True, inplace=True, active=ctx.active,
                                             settings=self.kernel_settings)
            o = o[:, None]
        else:
            o, final = self.delta_rule_op(q, k, v, g, beta, initial_state=state.recurrent if ctx.start else None,
                                          output_final_state=True)
            state.recurrent.copy_(final)
        gate = self.g_proj(x).view(b, t, self.v_heads, self.head_v)
        o = self.o_norm(o, gate).reshape(b, t, self.v_heads * self.head_v)
        return self.o_proj(o)
