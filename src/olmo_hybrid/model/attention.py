"""Softmax attention mixer (``self_attn``): full-width q/k RMSNorm, optional RoPE, causal SDPA."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.model.cache import AttnLayerCache
from olmo_hybrid.model.layers import RMSNorm, apply_rotary


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.kv_heads, self.head_dim = c.n_heads, c.kv_heads, c.head_dim
        q_dim, kv_dim = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
        self.q_proj = nn.Linear(c.d_model, q_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, c.d_model, bias=False)
        # OLMo 2/3 normalise the whole projection (all heads jointly), before the head split.
        self.q_norm = RMSNorm(q_dim, c.norm_eps)
        self.k_norm = RMSNorm(kv_dim, c.norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, d]
        rope: tuple[torch.Tensor, torch.Tensor] | None,  # cos, sin [B, T, head_dim] or None (NoPE)
        mask: torch.Tensor | None,  # [B, 1, T, S] bool (True = may attend) or None for plain causal
        cache: AttnLayerCache | None = None,
        start: int | torch.Tensor = 0,
        span: int | None = None,
        attend: Callable | None = None,
    ) -> torch.Tensor:
        """With a cache, ``start`` is where the new tokens go: an int shared by the batch, or a LongTensor [B] of
        per-row positions for one token per row (continuous batching), which then attends to the first ``span``
        cached positions under ``mask``, or through ``attend(q, cache.keys, cache.values)`` when given."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_norm(self.k_proj(x)).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            if isinstance(start, torch.Tensor):
                rows = torch.arange(b, device=x.device)
                cache.keys[rows, :, start] = k[:, :, 0]
                cache.values[rows, :, start] = v[:, :, 0]
                if attend is not None:
                    o = attend(q, cache.keys, cache.values)
                    return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
                end = span
            else:
                cache.keys[:, :, start:start + t] = k
                cache.values[:, :, start:start + t] = v
                end = start + t
            k, v = cache.keys[:, :, :end], cache.values[:, :, :end]
        if self.kv_heads != self.n_heads:
            rep = self.n_heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
