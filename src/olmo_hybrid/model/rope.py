"""Positions -> rotations: the one place that decides how attention layers see token positions.

``rope_parameters(config, device)`` turns the config into inverse frequencies and an attention scaling factor
(the pair transformers' rope initialisers return); ``RotaryEmbedding`` turns positions [B, T] into cos/sin (or
None for NoPE) once per forward call, and every attention layer applies them with :func:`apply_rotary`.
Rope types other than the ones implemented here are refused by name.
"""

from __future__ import annotations

import torch
from torch import nn

from olmo_hybrid.config import ConfigError, ModelConfig

ROPE_TYPES = ("default",)


def rope_parameters(config: ModelConfig, device=None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim / 2] fp32, attention_scaling)`` for ``config.rope_type``.

    The frequencies are computed on ``device`` at every call instead of being stored as a buffer: a buffer would
    be cast by ``model.to(bfloat16)`` and left uninitialised by meta-device construction.
    """
    if config.rope_type == "default":
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
        return inv_freq, 1.0
    raise ConfigError(f"model.rope_type: {config.rope_type!r} is not implemented (implemented: "
                      f"{', '.join(ROPE_TYPES)})")


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE tables for the attention layers; holds no tensors, so state dicts do not change."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.enabled = config.rope_theta is not None and config.n_attn_layers > 0
        if self.enabled:
            rope_parameters(config, device="meta")  # refuse an unimplemented rope type at construction

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """fp32 (cos, sin), each [B, T, head_dim], for integer ``positions`` [B, T]; None for NoPE."""
        if not self.enabled:
            return None
        inv_freq, scaling = rope_parameters(self.config, positions.device)
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if scaling != 1.0:
            cos, sin = cos * scaling, sin * scaling
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by cos/sin [B, T, D] (rotate-half convention), in fp32."""
    dtype = x.dtype
    x = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos[:, None] + rotated * sin[:, None]).to(dtype)
