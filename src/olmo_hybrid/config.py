"""Configuration: plain dataclasses, named presets, and dotted command-line overrides.

Every config in the project (model, data, optimizer, trainer, ...) is a dataclass handled by the
helpers here, so there is one way to build a config from a dict or JSON file, one way to override a
field from the command line (``model.layer_pattern=GGGA``), and one error style: an unknown or
ill-typed field is rejected with its dotted path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from olmo_hybrid.errors import ConfigError

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Generic dataclass <-> dict machinery


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert ``value`` (from JSON or a command-line string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        last_err = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                last_err = e
        raise last_err or ConfigError(f"{path}: cannot interpret {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip().startswith("[") else value.split(",")
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: expected a JSON list such as [0.9, 0.95] or comma-separated values, "
                                  f"got {value!r} ({e.msg})") from e
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        items = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if "e" in value.lower() else int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(number):  # no setting means anything at inf or nan
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def _conforms(value: Any, tp: Any) -> bool:
    """Whether ``value`` already is of annotated type ``tp`` (no conversion): what a dataclass built in Python,
    not through ``from_dict``, must hold. Floats must be finite; an int is a float, a bool is neither."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        inner = (typing.get_args(tp) or (Any,))[0]
        return isinstance(value, (list, tuple)) and all(_conforms(v, inner) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return True  # nested dataclasses check themselves; other annotations are not checked here


def check_types(cfg, path: str = "") -> None:
    """Every field of dataclass ``cfg`` (and of nested ones) holds a value of its annotated type, floats finite
    (inf and nan mean nothing in any setting); a ConfigError names the dotted field otherwise."""
    for name, tp in _field_types(type(cfg)).items():
        value = getattr(cfg, name, None)
        if dataclasses.is_dataclass(value):
            check_types(value, f"{path}{name}.")
        elif not _conforms(value, tp):
            raise ConfigError(f"{path}{name}: expected {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args) + (" or null" if len(args) < len(typing.get_args(tp)) else "")
    if typing.get_origin(tp) in (list, tuple):
        return f"a list of {_type_name(args[0]).split(' ', 1)[1]}s" if args else "a list"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(tp, str(tp))


def coerce_field(cls, name: str, value: Any, path: str) -> Any:
    """``value`` converted to the annotated type of field ``name`` of dataclass ``cls``; a ConfigError names
    ``path`` when it cannot be."""
    return _coerce(value, _field_types(cls)[name], path)


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ``ConfigError`` naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(f"unknown config field '{full}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a nested settings class's own check: name the config path too
        raise ConfigError(f"{path or cls.__name__}: {e}") from e


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Return a copy of ``cfg`` with ``a.b.c=value`` overrides applied (validated again)."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for i, key in enumerate(keys[:-1]):
            if not isinstance(node, dict) or key not in node or not isinstance(node[key], dict):
                raise ConfigError(f"unknown config section '{'.'.join(keys[: i + 1])}' in override {item!r}")
            node = node[key]
        if keys[-1] not in node:
            raise ConfigError(f"unknown config field '{dotted}' in override {item!r}")
        node[keys[-1]] = raw
    return from_dict(type(cfg), data)


def read_json_object(path: str | Path, what: str = "config file", error: type[Exception] = ConfigError) -> dict:
    """The top-level JSON object of ``path`` (not yet validated against any dataclass); a missing or unreadable
    file, invalid JSON or another top-level value raises ``error`` naming ``what`` and the file."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {p} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{what} {p} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{what} {p}: expected a JSON object at the top level")
    return data


def load_json(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, read_json_object(path))


# --------------------------------------------------------------------------------------------------
# Kernel settings (part of the model config, so a run records the numerics it trained with)

DOT_PRECISIONS = ("bf16", "tf32", "tf32r")


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class KernelSettings:
    """Dot precision and tile/warp choices of the chunked gated-delta-rule (and SSD) kernels, passed to the ops as
    ``settings=`` (never read from the environment; the custom ops receive them as plain arguments, so eager runs,
    fake implementations and ``torch.compile`` graphs see the same values). The defaults are the settings measured
    fastest at the stated accuracy on an H100 (docs/benchmarks_history.md). The torch and fla backends and the
    decode-step kernel have no such choices and ignore them."""

    dot: str = "bf16"
    """Dot-product operands for bfloat16/float16 inputs: "bf16" (bf16 operands, fp32 accumulation; the products
    with the UT inverses stay tf32), "tf32" (every product tf32: two thirds of the error at 1.6x the time), or
    "tf32r" (tf32 with operands rounded to nearest first; Triton feeds tf32 tensor cores truncated fp32).
    float32 inputs always use exact fp32 products."""

    backward_dot: str | None = None
    """The same choice for the backward kernels alone; None uses ``dot``."""

    block_v: int | None = None
    """V tile of the sequential kernels (forward, backward state pass), a power of two, clamped to
    [16, next power of two of V]; None: 64 with bf16 operands, else 32 (16 for key heads over 128)."""

    warps: int = 4
    """Warps per program of the sequential kernels."""

    stages: int = 1
    """Software-pipelining stages of the sequential kernels."""

    backward_block_v: int | None = None
    """V tile of the parallel backward kernels (dq, dk), a power of two, at most the next power of two of V
    (at least 16); None: 64 with bf16 operands, else 16."""

    backward_warps: int = 4
    """Warps per program of the parallel backward kernels (8 miscompiled small heads with tf32 operands on
    Triton 3.6, docs/benchmarks_history.md)."""

    backward_stages: int = 1
    """Software-pipelining stages of the parallel backward kernels."""

    def __post_init__(self):
        for name in ("dot", "backward_dot"):
            value = getattr(self, name)
            if value is not None and value not in DOT_PRECISIONS:
                raise ValueError(f"KernelSettings.{name}={value!r}: expected one of {', '.join(DOT_PRECISIONS)}")
        for name in ("block_v", "warps", "backward_block_v", "backward_warps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not _power_of_two(value)):
                raise ValueError(f"KernelSettings.{name}={value!r}: expected a power of two")
        for name in ("stages", "backward_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KernelSettings.{name}={value!r}: expected an integer >= 1")

    @property
    def dot_backward(self) -> str:
        """The backward kernels' dot precision (``backward_dot``, else ``dot``)."""
        return self.dot if self.backward_dot is None else self.backward_dot


# --------------------------------------------------------------------------------------------------
# The model

GDN, ATTN, MAMBA = "G", "A", "M"
LAYER_KINDS = {GDN: "GDN", ATTN: "attention", MAMBA: "Mamba2"}
ROPE_TYPES = ("default", "yarn")  # how positions become rotations (model/rope.py)
YARN_FIELDS = ("rope_factor", "rope_original_max_seq_len", "rope_beta_fast", "rope_beta_slow", "rope_attention_factor",
               "rope_mscale", "rope_mscale_all_dim", "rope_truncate")


@dataclass
class ModelConfig:
    """Shape of a hybrid GDN / attention language model.

    ``layer_pattern`` is a string over {G, A, M} (Gated DeltaNet, softmax attention, Mamba2). A pattern shorter
    than ``n_layers`` is repeated; "GGGA" gives OLMo Hybrid's 3:1 interleave with attention at
    ``i % 4 == 3``; "A" is a transformer, "G" pure GDN, "MMMA" the paper's hybrid Mamba2 baseline and "M" pure
    Mamba2; any full-length string places layers freely.
    """

    vocab_size: int = 100352
    d_model: int = 3840
    n_layers: int = 32
    layer_pattern: str = "GGGA"
    # softmax attention
    n_heads: int = 30
    n_kv_heads: int | None = None  # None: multi-head attention (as many KV heads as n_heads)
    rope_theta: float | None = None  # None: no positional encoding (NoPE), as the released 7B
    rope_type: str = "default"  # "default" or "yarn": how positions become rotations (model/rope.py)
    # YaRN (rope_type "yarn"), transformers' rope_parameters with a rope_ prefix. None means transformers'
    # default: beta_fast 32, beta_slow 1, truncate true, attention_factor 0.1 ln(factor) + 1 (or from mscale).
    rope_factor: float | None = None  # how many times the original length positions are stretched to
    rope_original_max_seq_len: int | None = None  # original_max_position_embeddings: the length RoPE was trained at
    rope_beta_fast: float | None = None
    rope_beta_slow: float | None = None
    rope_attention_factor: float | None = None  # multiplies cos and sin (so attention logits by its square)
    rope_mscale: float | None = None
    rope_mscale_all_dim: float | None = None
    rope_truncate: bool | None = None  # round the interpolation ramp's bounds to whole dimensions
    # Gated DeltaNet
    gdn_heads: int = 30
    gdn_v_heads: int | None = None  # None: as many value heads as gdn_heads; more gives grouped value heads
    gdn_head_k: int = 96
    gdn_head_v: int = 192
    gdn_conv_size: int = 4
    gdn_allow_neg_eigval: bool = True  # beta = 2*sigmoid in (0, 2)
    # Mamba2 (transformers' Mamba2Config names in comments); mamba_heads = mamba_expand * d_model / mamba_head_dim
    mamba_expand: int = 2  # expand: the mixer's inner width is mamba_expand * d_model
    mamba_head_dim: int = 64  # head_dim
    mamba_state_size: int = 128  # state_size (N)
    mamba_n_groups: int = 1  # n_groups: heads sharing one B and C
    mamba_conv_size: int = 4  # conv_kernel
    mamba_chunk_size: int = 256  # chunk_size: recorded for export; our kernels chunk by 64 (same result)
    mamba_proj_bias: bool = False  # use_bias: biases of in_proj and out_proj
    mamba_conv_bias: bool = True  # use_conv_bias
    # MLP and the rest
    mlp_hidden: int = 11008
    norm_eps: float = 1e-6
    max_seq_len: int = 65536
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Token ids of a Hugging Face config.json, written back on export. pad_token_id is also the embedding row that
    # never receives a gradient (transformers builds its embedding with padding_idx=pad_token_id); None for none.
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # The Triton kernels' numerics and tiles (``model.kernels.dot=tf32``); not part of the HF config: a checkpoint
    # loads with the defaults, a run directory with the settings it trained with.
    kernels: KernelSettings = dataclasses.field(default_factory=KernelSettings)

    def __post_init__(self):
        self.validate()

    # -- derived shapes ------------------------------------------------------------------------------
    @property
    def layer_types(self) -> list[str]:
        p = self.layer_pattern
        if len(p) == self.n_layers:
            return list(p)
        return [p[i % len(p)] for i in range(self.n_layers)]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_gdn_layers(self) -> int:
        return self.layer_types.count(GDN)

    @property
    def n_attn_layers(self) -> int:
        return self.layer_types.count(ATTN)

    @property
    def n_mamba_layers(self) -> int:
        return self.layer_types.count(MAMBA)

    @property
    def mamba_heads(self) -> int:
        return self.mamba_expand * self.d_model // self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        """Channels of the Mamba2 conv: x (heads x head dim) and the groups' B and C."""
        return self.mamba_expand * self.d_model + 2 * self.mamba_n_groups * self.mamba_state_size

    def validate(self) -> None:
        def bad(name, why):
            raise ConfigError(f"model.{name}: {why}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "gdn_heads", "gdn_head_k",
                     "gdn_head_v", "gdn_conv_size", "mamba_expand", "mamba_head_dim", "mamba_state_size",
                     "mamba_n_groups", "mamba_conv_size", "mamba_chunk_size", "mlp_hidden", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, f"must be a positive integer, got {v!r}")
        p = self.layer_pattern
        if not isinstance(p, str) or not p or set(p) - set(LAYER_KINDS):
            bad("layer_pattern", f"must be a non-empty string of 'G' (GDN), 'A' (attention) and 'M' (Mamba2), "
                f"got {p!r}")
        if len(p) != self.n_layers and self.n_layers % len(p) != 0:
            bad("layer_pattern", f"length {len(p)} neither equals n_layers={self.n_layers} nor divides it")
        check_types(self, "model.")
        for name in ("n_kv_heads", "gdn_v_heads"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                bad(name, f"must be a positive integer or null (as many as the query heads), got {getattr(self, name)}")
        if self.rope_type not in ROPE_TYPES:
            bad("rope_type", f"{self.rope_type!r} is not implemented (implemented: {', '.join(ROPE_TYPES)})")
        if self.init_std < 0:
            bad("init_std", f"must be >= 0, got {self.init_std}")
        if ATTN in self.layer_types:
            if self.d_model % self.n_heads:
                bad("n_heads", f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            kv = self.n_kv_heads or self.n_heads
            if kv <= 0 or self.n_heads % kv:
                bad("n_kv_heads", f"n_heads={self.n_heads} is not a multiple of n_kv_heads={kv}")
            if self.rope_theta is not None and self.head_dim % 2:
                bad("rope_theta", f"RoPE needs an even head dim, got {self.head_dim}")
        if self.rope_theta is not None and not self.rope_theta > 0:
            bad("rope_theta", f"must be positive or null (no RoPE), got {self.rope_theta}")
        self._validate_yarn(bad)
        if (self.gdn_v_heads or self.gdn_heads) % self.gdn_heads:
            bad("gdn_v_heads", f"{self.gdn_v_heads} is not a multiple of gdn_heads={self.gdn_heads}")
        if MAMBA in self.layer_types:
            inner = self.mamba_expand * self.d_model
            if inner % self.mamba_head_dim:
                bad("mamba_head_dim", f"{self.mamba_head_dim} does not divide the inner width mamba_expand * "
                    f"d_model = {inner}")
            elif self.mamba_heads % self.mamba_n_groups:
                bad("mamba_n_groups", f"{self.mamba_n_groups} does not divide the {self.mamba_heads} Mamba2 heads")
        if not self.norm_eps > 0:
            bad("norm_eps", f"must be positive, got {self.norm_eps}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            bad("pad_token_id", f"{self.pad_token_id} is not a token id (vocab_size={self.vocab_size}); it names the "
                "embedding row that gets no gradient")

    def _validate_yarn(self, bad) -> None:
        set_fields = [f for f in YARN_FIELDS if getattr(self, f) is not None]
        if self.rope_type != "yarn":
            if set_fields:
                bad(set_fields[0], f"is a YaRN setting, used only with rope_type='yarn' (rope_type is "
                                   f"{self.rope_type!r}); leave it null")
            return
        if self.rope_theta is None:
            bad("rope_type", "'yarn' rescales RoPE, but rope_theta is null (no RoPE): set rope_theta or use "
                             "rope_type='default'")
        for name in ("rope_factor", "rope_original_max_seq_len"):
            if getattr(self, name) is None:
                bad(name, "is required with rope_type='yarn'")
        if not self.rope_factor > 0:
            bad("rope_factor", f"must be positive, got {self.rope_factor}")
        if isinstance(self.rope_original_max_seq_len, bool) or not self.rope_original_max_seq_len > 0:
            bad("rope_original_max_seq_len", f"must be a positive integer, got {self.rope_original_max_seq_len!r}")
        for name in ("rope_beta_fast", "rope_beta_slow", "rope_attention_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                bad(name, f"must be positive or null (the default), got {value}")
        fast, slow = self.rope_beta_fast or 32, self.rope_beta_slow or 1
        if fast < slow:
            bad("rope_beta_fast", f"must be at least rope_beta_slow, got {fast} < {slow}")

    # -- sizes ---------------------------------------------------------------------------------------
    def gdn_mixer_params(self) -> int:
        d, h, hv = self.d_model, self.gdn_heads, self.gdn_v_heads or self.gdn_heads
        key, val = h * self.gdn_head_k, hv * self.gdn_head_v
        proj = d * (2 * key + 2 * val) + val * d + 2 * d * hv  # q k v g, o, a b
        conv = (2 * key + val) * self.gdn_conv_size
        return proj + conv + self.gdn_head_v + 2 * hv  # o_norm, A_log, dt_bias

    def mamba_mixer_params(self) -> int:
        d, h, inner, conv = self.d_model, self.mamba_heads, self.mamba_expand * self.d_model, self.mamba_conv_dim
        proj = d * (inner + conv + h) + inner * d  # in_proj [z | xBC | dt], out_proj
        if self.mamba_proj_bias:
            proj += inner + conv + h + d
        conv_params = conv * (self.mamba_conv_size + self.mamba_conv_bias)
        return proj + conv_params + 3 * h + inner  # dt_bias, A_log, D; the gated norm

    def attn_mixer_params(self) -> int:
        d, hd = self.d_model, self.head_dim
        q, kv = self.n_heads * hd, (self.n_kv_heads or self.n_heads) * hd
        return d * q + 2 * d * kv + q * d + q + kv  # q k v o projections, q/k norms

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count. ``embeddings=False`` drops the input embedding only (the LM head counts)."""
        mlp = 3 * self.d_model * self.mlp_hidden
        block = mlp + 2 * self.d_model
        n = self.n_gdn_layers * (block + self.gdn_mixer_params())
        n += self.n_attn_layers * (block + self.attn_mixer_params())
        n += self.n_mamba_layers * (block + self.mamba_mixer_params())
        n += self.d_model  # final norm
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        emb = self.vocab_size * self.d_model
        return n + head + (emb if embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward) at context ``seq_len``.

        Dense matmuls count 6 per parameter (embedding lookup excluded). Attention adds the causal
        score and value matmuls (2 * 2 * T/2 * d per layer forward). GDN adds the chunked
        algorithm's forward work, 6CK + 4CV + 6KV per token-head with chunk C=64 (the products of fla's
        chunked forward: K K^T 2CK, W 2CK, U 2CV, state update 4KV, output 2KV + 2CK + 2CV).
        Mamba2 adds the chunked SSD's, 2CN + 2CP + 4NP per token-head (Q K^T and its product with V inside the
        chunk, the state's read and write; N state size, P head dim).
        """
        dense = 6 * (self.num_params(embeddings=False) - self.d_model)
        attn = self.n_attn_layers * 3 * (2 * 2 * (seq_len / 2) * self.n_heads * self.head_dim)
        c, k, v = 64, self.gdn_head_k, self.gdn_head_v
        gdn = self.n_gdn_layers * 3 * (self.gdn_v_heads or self.gdn_heads) * (6 * c * k + 4 * c * v + 6 * k * v)
        n, hd = self.mamba_state_size, self.mamba_head_dim
        mamba = self.n_mamba_layers * 3 * self.mamba_heads * (2 * c * n + 2 * c * hd + 4 * n * hd)
        return float(dense + attn + gdn + mamba)

    def resolved(self) -> "ModelConfig":
        """This config with the optional head counts filled in (``n_kv_heads = n_heads``, ``gdn_v_heads =
        gdn_heads`` where None): what the model and its cache are built from. Configs themselves keep None, so
        overriding ``n_heads`` later still means multi-head attention."""
        return dataclasses.replace(self, n_kv_heads=self.n_kv_heads or self.n_heads,
                                   gdn_v_heads=self.gdn_v_heads or self.gdn_heads)

    def with_pattern(self, pattern: str) -> "ModelConfig":
        return dataclasses.replace(self, layer_pattern=pattern)


# --------------------------------------------------------------------------------------------------
# Presets


def _olmo3_mlp_hidden(d_model: int, multiplier: float = 1.0) -> int:
    """OLMo-core's SwiGLU width: int(8d/3), times the multiplier, rounded up to a multiple of 256."""
    hidden = int(multiplier * int(8 * d_model / 3))
    return 256 * math.ceil(hidden / 256)


def _ladder(d_model: int, n_layers: int, n_heads: int) -> ModelConfig:
    """A scaling-ladder hybrid derived from the OLMo 3 transformer of the same size.

    Rule (OLMo-core ``hybrid-ladders`` branch): keep the OLMo 3 ladder's width, depth, heads and MLP
    (SwiGLU multiplier 1.5 for the ladder); swap 3 of every 4 attention layers for GDN with one GDN head
    per attention head, key head dim 0.75 * d_model / heads rounded up to a multiple of 128, value
    head dim 2x that. This reproduces the ladder's published non-embedding counts (60M: 72.9M, 190M:
    254.4M, 760M: 947.9M, 1B: 1.48B). The 7B was derived the same way except that it keeps the exact
    key dim int(0.75 * d / heads) = 96 and drops two heads (d_model 4096 -> 3840) to match OLMo 3 7B.

    Mamba2 layers (``layer_pattern=MMMA`` or ``M``), from OLMo-core's ladder analysis (``model_specs.py``
    ``mamba2_dims``): one Mamba2 head per attention head, so head dim 2 * d_model / heads (expand 2; 256 at
    1B), state 128, one group, conv 4. Its parameter formula also counts in/out projection biases and no conv
    bias; with ``mamba_proj_bias=true mamba_conv_bias=false`` our count equals its published pure/hybrid Mamba
    ladder counts (100M, 190M; tests/model/test_mamba2_model.py). The presets keep mamba_ssm's own defaults
    (no projection biases, a conv bias): which the ladder trained with is not recorded.
    """
    head_k = 128 * math.ceil(0.75 * d_model / n_heads / 128)
    return ModelConfig(
        d_model=d_model, n_layers=n_layers, n_heads=n_heads, gdn_heads=n_heads,
        gdn_head_k=head_k, gdn_head_v=2 * head_k, mamba_head_dim=2 * d_model // n_heads,
        mlp_hidden=_olmo3_mlp_hidden(d_model, 1.5), rope_theta=500_000.0, max_seq_len=8192,
    )


def _micro(d_model: int) -> ModelConfig:
    """A micro-ladder size: ``_ladder`` at 4 layers with one 64-wide head per 64 channels and a 4096-id vocabulary."""
    return dataclasses.replace(_ladder(d_model, 4, d_model // 64), vocab_size=4096)


def _olmo_hybrid_7b() -> ModelConfig:
    return ModelConfig()  # the defaults are the released model


def _tiny_model() -> ModelConfig:
    # Sized for the main job (2 CPU cores, the bundled corpus, a small BPE vocabulary; time: README, "Training").
    return ModelConfig(
        vocab_size=4096, d_model=256, n_layers=4, n_heads=4, gdn_heads=4, gdn_head_k=48,
        gdn_head_v=96, mlp_hidden=768, rope_theta=10_000.0, max_seq_len=1024, init_std=0.02,
    )


MODEL_PRESETS: dict[str, typing.Callable[[], ModelConfig]] = {
    "tiny": _tiny_model,
    "60m": lambda: _ladder(384, 8, 8),
    "100m": lambda: _ladder(512, 12, 8),
    "190m": lambda: _ladder(768, 12, 12),
    "370m": lambda: _ladder(1024, 16, 16),
    "600m": lambda: _ladder(1280, 16, 16),
    "760m": lambda: _ladder(1536, 16, 16),
    "1b": lambda: _ladder(2048, 16, 16),
    # Micro ladder for scaling studies on one GPU (docs/scaling.md): 4 layers, 64-wide heads, the same rule;
    # vocabulary 4096, a BPE trained by `olmo-hybrid prepare --bpe-vocab 4096` (the ladder sets the corpus's).
    "micro-64": lambda: _micro(64),
    "micro-128": lambda: _micro(128),
    "micro-192": lambda: _micro(192),
    "micro-256": lambda: _micro(256),
    "olmo-hybrid-7b": _olmo_hybrid_7b,
}

# Named layer patterns for the paper's comparisons ("middle" is built per depth, see below).
PATTERNS = {
    "hybrid": "GGGA",       # 3:1, OLMo Hybrid
    "hybrid-half": "GA",     # 1:1
    "hybrid-eighth": "GGGGGGGA",  # 7:1
    "transformer": "A",
    "pure-gdn": "G",
    "hybrid-mamba2": "MMMA",  # 3:1 Mamba2:attention, the paper's hybrid Mamba2 baseline
    "pure-mamba2": "M",
}


def middle_pattern(n_layers: int, n_attn: int) -> str:
    """``n_attn`` attention layers as one block centred in the stack, GDN elsewhere."""
    start = (n_layers - n_attn) // 2
    return "".join(ATTN if start <= i < start + n_attn else GDN for i in range(n_layers))


def resolve_pattern(name_or_pattern: str, n_layers: int) -> str:
    """Turn a named pattern (``hybrid``, ``transformer``, ``middle``...) or a literal one into a string."""
    if name_or_pattern in PATTERNS:
        return PATTERNS[name_or_pattern]
    if name_or_pattern == "middle":
        return middle_pattern(n_layers, max(1, n_layers // 4))
    return name_or_pattern


def model_preset(name: str, **overrides) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset '{name}' (known: {', '.join(MODEL_PRESETS)})")
    cfg = MODEL_PRESETS[name]()
    if "layer_pattern" in overrides:
        overrides["layer_pattern"] = resolve_pattern(overrides["layer_pattern"], overrides.get("n_layers", cfg.n_layers))
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ConfigError(f"unknown model field(s) {', '.join(unknown)} for preset '{name}'")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
