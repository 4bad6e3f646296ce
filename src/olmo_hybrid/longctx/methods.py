"""How a model's positions change when its context is extended: DRoPE, YaRN, or nothing.

Each method maps a trained model's ``ModelConfig`` to the config of the extended model; the weights are the
same tensors (no method adds or reshapes a parameter), so the extended model loads the source's state dict.

- ``drope``: drop RoPE from every attention layer (``rope_theta`` -> null, NoPE), as OLMo Hybrid did at the
  start of its long-context stage (GDN layers never had positions). The original DroPE recipe (Gelberg et al.
  2025) follows the drop with a short recalibration at the original length and then extends zero-shot: the same
  config, trained at the original length (``olmo-hybrid extend --recalibrate``).
- ``yarn``: YaRN on the attention layers with the paper's settings (beta_fast 32, beta_slow 1) and
  ``factor = new length / original length`` (OLMo's runs: factor 8, original 8192). A YaRN source is rescaled
  from its own original length (never a factor on top of its factor), keeping its betas, mscale and truncate; an
  explicit attention factor was chosen for the old factor, so it is dropped and derived from the new one.
- ``none``: RoPE unchanged; only the window grows (the "no extension" control when trained, and plain RoPE
  extrapolation when not).

The new window is never shorter than the source's (extending does not shrink a model), and YaRN needs a window
longer than the original length (a factor of 1 or less is plain RoPE or a compression).
"""

from __future__ import annotations

import dataclasses

from olmo_hybrid.config import YARN_FIELDS, ModelConfig
from olmo_hybrid.errors import ConfigError
from olmo_hybrid.model.rope import yarn_attention_factor

METHODS = ("yarn", "drope", "none")
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0  # the paper's YaRN baseline (and YaRN's own defaults)


def drop_rope(config: ModelConfig) -> ModelConfig:
    """``config`` with no positional encoding in any attention layer (NoPE): RoPE and any YaRN scaling removed."""
    return dataclasses.replace(config, rope_theta=None, rope_type="default", **{f: None for f in YARN_FIELDS})


def original_length(config: ModelConfig, trained_len: int | None, method: str = "yarn") -> int:
    """The length the extension starts from: for YaRN (and the record of ``none``) a YaRN source's own original
    length, which its scaling is relative to; otherwise, and for DroPE's recalibration, the sequence length the
    source trained at (its run's data.seq_len) when known, else its window."""
    if config.rope_type == "yarn" and method != "drope":
        return config.rope_original_max_seq_len
    return trained_len or config.max_seq_len


def extended_config(config: ModelConfig, method: str, seq_len: int, original_len: int) -> ModelConfig:
    """The extended model's config: positions by ``method``, window ``seq_len`` (longer sequences are refused by
    the model unless a caller widens the window on purpose)."""
    if method not in METHODS:
        raise ConfigError(f"unknown extension method {method!r} (known: {', '.join(METHODS)})")
    if seq_len < 1 or original_len < 1:
        raise ConfigError(f"lengths must be positive, got seq_len={seq_len} and original length {original_len}")
    if seq_len < config.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len:,} is shorter than the source's window of {config.max_seq_len:,} "
                          "tokens: extend lengthens the context")
    has_rope = config.rope_theta is not None and config.n_attn_layers > 0
    if method == "drope":
        if not has_rope:
            raise ConfigError("--method drope: the source has no RoPE to drop (it is already NoPE"
                              f"{'' if config.n_attn_layers else ', having no attention layer'}); use --method none")
        return dataclasses.replace(drop_rope(config), max_seq_len=seq_len)
    if method == "yarn":
        if not has_rope:
            raise ConfigError("--method yarn: the source has no RoPE (NoPE"
                              f"{'' if config.n_attn_layers else ', no attention layer'}), so there is nothing to "
                              "rescale; use --method none")
        if config.rope_type not in ("default", "yarn"):
            raise ConfigError(f"--method yarn: the source's rope_type {config.rope_type!r} cannot be rescaled")
        if config.rope_type == "yarn" and original_len != config.rope_original_max_seq_len:
            raise ConfigError(f"--method yarn: --original-len {original_len:,} contradicts the source's YaRN original "
                              f"length {config.rope_original_max_seq_len:,}, which its scaling is relative to")
        if seq_len <= original_len:
            raise ConfigError(f"--method yarn: --seq-len {seq_len:,} must exceed the original length "
                              f"{original_len:,} (YaRN factor = {seq_len:,} / {original_len:,} = "
                              f"{seq_len / original_len:g}; a factor of 1 or less does not extend)")
        yarn = {f: getattr(config, f) for f in YARN_FIELDS} if config.rope_type == "yarn" else \
            {"rope_beta_fast": YARN_BETA_FAST, "rope_beta_slow": YARN_BETA_SLOW}
        yarn.update(rope_factor=seq_len / original_len, rope_original_max_seq_len=original_len,
                    rope_attention_factor=None)
        return dataclasses.replace(config, rope_type="yarn", max_seq_len=seq_len, **yarn)
    return dataclasses.replace(config, max_seq_len=seq_len)


def describe_positions(config: ModelConfig) -> str:
    """One line: how this config's attention layers see positions."""
    if not config.n_attn_layers:
        return "no attention layers (no positions)"
    if config.rope_theta is None:
        return "NoPE (no positional encoding in attention)"
    if config.rope_type == "yarn":
        return (f"YaRN factor {config.rope_factor:g} from {config.rope_original_max_seq_len} tokens "
                f"(theta {config.rope_theta:g}, beta {config.rope_beta_fast or YARN_BETA_FAST:g}/"
                f"{config.rope_beta_slow or YARN_BETA_SLOW:g}, attention factor {yarn_attention_factor(config):.4g})")
    return f"RoPE theta {config.rope_theta:g}"
