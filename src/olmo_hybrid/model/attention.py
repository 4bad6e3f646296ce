"""Softmax attention mixer (``self_attn``): full-width q/k RMSNorm, optional RoPE, causal attention.

The kernel follows from the call (``ForwardContext``): without a cache, SDPA (causal, or the packed-document
mask); prefilling cache rows, SDPA over the cached prefix plus the new keys; decoding one token per row,
``ops.decode_attention``, which reads each row's length on the device. The SDPA call sits in its own tensor-free
module, :class:`AttentionOp`, so that a wrapper can replace it from outside (context parallelism does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from olmo_hybrid import ops
from olmo_hybrid.config import ModelConfig
from olmo_hybrid.model.cache import AttnLayerState
from olmo_hybrid.model.context import ForwardContext
from olmo_hybrid.model.layers import RMSNorm
from olmo_hybrid.model.rope import apply_rotary


class AttentionOp(nn.Module):
    """Softmax attention of q [B, H, T, D] over k, v [B, Hkv, S, D], the KV heads repeated for grouped queries:
    causal when ``mask`` is None, else SDPA's ``mask`` (boolean [B, 1, T, S], or a causal bias object).

    Holds no tensors, so replacing it leaves state dicts unchanged: the hook through which context parallelism
    (``olmo_hybrid.train.context_parallel``) runs attention on a slice of each sequence."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        self.q_proj = nn.Linear(c.d_model, q_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, c.d_model, bias=False)
        # OLMo 2/3 normalise the whole projection (all heads jointly), before the head split.
        self.q_norm = RMSNorm(q_dim, c.norm_eps)
        self.k_norm = RMSNorm(kv_dim, c.norm_eps)
        self.attention_op = AttentionOp()

    def forward(self, x: torch.Tensor, ctx: ForwardContext, state: AttnLayerState | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_norm(self.k_proj(x)).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if ctx.rope is not None:
            q, k = apply_rotary(q, *ctx.rope), apply_rotary(k, *ctx.rope)
        if state is not None and ctx.decoding:
            # Rows that are not active write past their length, where nothing is read.
            rows = torch.arange(b, device=x.device)
            state.keys[rows, :, ctx.positions] = k[:, :, 0]
            state.values[rows, :, ctx.positions] = v[:, :, 0]
            o = ops.decode_attention(q, state.keys, state.values, ctx.lengths)
        else:
            if state is not None:  # prefill: append to the cached prefix, attend to all of it
                end = ctx.start + t
                state.keys[:, :, ctx.start:end] = k
                state.values[:, :, ctx.start:end] = v
                k, v = state.keys[:, :, :end], state.values[:, :, :end]
            o = self.attention_op(q, k, v, ctx.attn_mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
