"""Memory budget of the engine: cache bytes per sequence, workspace, budget checks.

The cache figure is ``model/cache.py: cache_bytes_per_sequence`` (the same number ``olmo-hybrid info``
prints); the engine's ``HybridCache`` allocates exactly that per slot. The workspace figure is an estimate of the largest
transient activations (one prefill chunk, one decode step's logits and sort), used only to check free
device memory before allocating; the benchmark measures the real peak.
"""

from __future__ import annotations

import torch

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.errors import OlmoHybridError
from olmo_hybrid.model.cache import cache_bytes_per_sequence


class MemoryBudgetError(OlmoHybridError, MemoryError):
    """The requested cache or request does not fit in the memory budget; the message names the numbers."""


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n)} B"


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def sequence_bytes(config: ModelConfig, context: int, dtype: torch.dtype) -> dict[str, int]:
    """Cache bytes for one sequence of ``context`` tokens with KV and conv states in ``dtype``."""
    return cache_bytes_per_sequence(config, context, kv_bytes=element_size(dtype))


def describe_sequence_bytes(mem: dict[str, int]) -> str:
    mamba = f" + Mamba2 state {format_bytes(mem['mamba_state'])}" if mem["mamba_state"] else ""
    return (f"{format_bytes(mem['total'])} (KV {format_bytes(mem['kv_cache'])} + GDN state "
            f"{format_bytes(mem['gdn_state'])}{mamba} + conv {format_bytes(mem['conv_state'])})")


def workspace_bytes(config: ModelConfig, prefill_chunk: int, max_batch: int, dtype: torch.dtype) -> int:
    """Rough upper estimate of transient activation memory of the engine (not counted in the cache)."""
    c, item = config.resolved(), element_size(dtype)
    gdn_width = 2 * c.gdn_heads * c.gdn_head_k + 3 * c.gdn_v_heads * c.gdn_head_v
    # A Mamba2 mixer's widest activations: in_proj's [z | xBC | dt], then y and the gated norm.
    mamba_width = 2 * c.mamba_expand * c.d_model + c.mamba_conv_dim + c.mamba_heads if c.n_mamba_layers else 0
    mixer_width = max(gdn_width, mamba_width)
    per_token = (6 * c.d_model + 3 * c.mlp_hidden + 2 * mixer_width) * item
    per_token += 4 * (mixer_width + c.gdn_v_heads * 4)  # fp32 copies inside the GDN / SSD ops
    prefill = prefill_chunk * per_token + 2 * c.vocab_size * 4
    # Logits, scaled, sorted and probs in fp32 (decode steps update the GDN states in place).
    decode = max_batch * (per_token + 4 * c.vocab_size * 4)
    return max(prefill, decode)


def max_sequences(config: ModelConfig, context: int, budget_bytes: int, dtype: torch.dtype) -> int:
    """How many sequences of ``context`` tokens fit in ``budget_bytes`` of cache."""
    return max(0, budget_bytes // sequence_bytes(config, context, dtype)["total"])


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device (driver view), or None where it cannot be known (CPU)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free


def check_pool_fits(config: ModelConfig, max_batch: int, max_context: int, dtype: torch.dtype,
                    budget_bytes: int | None, device: torch.device, prefill_chunk: int,
                    reserved_bytes: int = 0) -> dict[str, int]:
    """Raise :class:`MemoryBudgetError` if ``max_batch`` slots of ``max_context`` tokens do not fit in the
    budget (cache only) or in free device memory (cache + estimated workspace + ``reserved_bytes``, e.g. weights
    still to be moved there). Returns the per-sequence bytes."""
    per_seq = sequence_bytes(config, max_context, dtype)
    pool = max_batch * per_seq["total"]
    what = (f"{max_batch} slots x {max_context} tokens = {format_bytes(pool)} of cache; one sequence needs "
            f"{describe_sequence_bytes(per_seq)}")
    if budget_bytes is not None and pool > budget_bytes:
        fits = max_sequences(config, max_context, budget_bytes, dtype)
        raise MemoryBudgetError(f"the cache does not fit the memory budget of {format_bytes(budget_bytes)}: {what}; "
                                f"at most {fits} sequences of {max_context} tokens fit")
    free = free_device_bytes(device)
    if free is not None:
        work = workspace_bytes(config, prefill_chunk, max_batch, dtype) + reserved_bytes
        if pool + work > free:
            fits = max_sequences(config, max_context, max(0, free - work), dtype)
            raise MemoryBudgetError(f"the cache does not fit in free memory on {device} ({format_bytes(free)}): "
                                    f"{what}, plus about {format_bytes(work)} of workspace and weights; at most "
                                    f"{fits} sequences of {max_context} tokens fit")
    return per_seq
