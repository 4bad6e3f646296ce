"""Positions -> rotations: the one place that decides how attention layers see token positions.

``rope_parameters(config, device)`` turns the config into inverse frequencies and an attention scaling factor
(the pair transformers' rope initialisers return); ``RotaryEmbedding`` turns positions [B, T] into cos/sin (or
None for NoPE) once per forward call, and every attention layer applies them with :func:`apply_rotary`.

Implemented rope types: ``default`` (plain RoPE) and ``yarn`` (YaRN, Peng et al. 2023), computed exactly as
transformers' ``_compute_yarn_parameters`` does from ``rope_parameters``, op for op in fp32, so logits match
``OlmoHybridForCausalLM``: the low frequencies (wavelengths longer than the original length / beta_slow) are
divided by ``factor``, the high ones (beta_fast rotations and more) kept, a linear ramp in between, and cos/sin
multiplied by the attention factor. Other rope types are refused by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from olmo_hybrid.config import ROPE_TYPES, ConfigError, ModelConfig

YARN_DEFAULT_BETA_FAST = 32.0
YARN_DEFAULT_BETA_SLOW = 1.0


def rope_parameters(config: ModelConfig, device=None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim / 2] fp32, attention_scaling)`` for ``config.rope_type``.

    The frequencies are computed on ``device`` at every call instead of being stored as a buffer: a buffer would
    be cast by ``model.to(bfloat16)`` and left uninitialised by meta-device construction. Everything is built on
    ``device`` from host scalars (no host-to-device copy), so the call is safe inside a CUDA graph capture.
    """
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
    if config.rope_type == "default":
        return 1.0 / (config.rope_theta ** exponents), 1.0
    if config.rope_type == "yarn":
        return _yarn(config, exponents, device)
    raise ConfigError(f"model.rope_type: {config.rope_type!r} is not implemented (implemented: "
                      f"{', '.join(ROPE_TYPES)})")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, 0.1 mscale ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(config: ModelConfig) -> float:
    """The factor cos and sin are multiplied by: given, or from ``factor`` (and ``mscale`` / ``mscale_all_dim``
    when both are set and non-zero), as transformers infers it."""
    if config.rope_attention_factor is not None:
        return config.rope_attention_factor
    factor, mscale, mscale_all_dim = config.rope_factor, config.rope_mscale, config.rope_mscale_all_dim
    if mscale and mscale_all_dim:
        return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
    return yarn_mscale(factor)


def yarn_correction_range(config: ModelConfig) -> tuple[float, float]:
    """The dimension pairs [low, high] over which YaRN ramps from extrapolation to interpolation."""
    dim, base, original = config.head_dim, config.rope_theta, config.rope_original_max_seq_len
    beta_fast = config.rope_beta_fast or YARN_DEFAULT_BETA_FAST
    beta_slow = config.rope_beta_slow or YARN_DEFAULT_BETA_SLOW

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the original length
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if config.rope_truncate is None or config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn(config: ModelConfig, exponents: torch.Tensor, device) -> tuple[torch.Tensor, float]:
    pos_freqs = config.rope_theta ** exponents
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (config.rope_factor * pos_freqs)
    low, high = yarn_correction_range(config)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(config.head_dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the dimension keeps its original frequency (extrapolates), 0: interpolated
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq, yarn_attention_factor(config)


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
