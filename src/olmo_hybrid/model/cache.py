"""The hybrid model's inference cache: a fixed number of sequence slots, each with its own length.

Slot ``s`` owns row ``s`` of every tensor: for attention layers keys and values ``[slots, Hkv, capacity, D]``
(the cache's dtype); for GDN layers the three short-conv states ``[slots, C, W-1]`` (the cache's dtype) and the
recurrent state ``[slots, HV, K, V]`` (float32); for Mamba2 layers one conv state ``[slots, conv_dim, W-1]`` and
the SSM state ``[slots, H, P, N]`` (float32). Attention layers need every past key and value, so their part
grows with ``capacity``; GDN and Mamba2 layers keep a fixed-size state. Everything is allocated once, so a pool
that cannot fit fails at construction, and its size is exactly ``slots * cache_bytes_per_sequence(config,
capacity)``, the figure ``olmo-hybrid info`` prints.

``lengths`` (long [slots], on the cache's device) counts the tokens cached per slot; ``HybridLM.forward``
advances it, so a decode step reads its positions on the device. A forward call addresses rows of the cache
through a :class:`CacheSlice`: ``cache.for_prefill(rows, start)`` (every row continues at host position
``start``) or ``cache.for_decode(rows, active)`` (one token per row at that row's length). Slots are handed out
lowest first, so running sequences stay packed at the front and a decode step works on the prefix ``[0, n)``
of every tensor (views, no gather).
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass
from typing import ClassVar

import torch

from olmo_hybrid.config import ATTN, MAMBA, ModelConfig


@dataclass
class AttnLayerState:
    keys: torch.Tensor  # [slots, Hkv, capacity, D]
    values: torch.Tensor  # [slots, Hkv, capacity, D]
    # Fields indexed by token position (axis 2, after slot and head): a prefix of them is the state of a prefix.
    # Every other field of a layer state is a fixed-size summary of the whole sequence so far. Code that copies
    # slot states (views, prefix snapshots) goes by this split only, so a new layer type just declares it.
    per_token: ClassVar[tuple[str, ...]] = ("keys", "values")


@dataclass
class GDNLayerState:
    conv_q: torch.Tensor  # [slots, H*K, W-1], the last pre-conv inputs (oldest first)
    conv_k: torch.Tensor  # [slots, H*K, W-1]
    conv_v: torch.Tensor  # [slots, HV*V, W-1]
    recurrent: torch.Tensor  # [slots, HV, K, V] float32
    per_token: ClassVar[tuple[str, ...]] = ()


@dataclass
class Mamba2LayerState:
    conv: torch.Tensor  # [slots, conv_dim, W-1], the last pre-conv inputs of x, B and C (oldest first)
    ssm: torch.Tensor  # [slots, H, P, N] float32
    per_token: ClassVar[tuple[str, ...]] = ()


LayerState = AttnLayerState | GDNLayerState | Mamba2LayerState


def cache_bytes_per_sequence(config: ModelConfig, context: int, kv_bytes: int = 2) -> dict[str, int]:
    """Cache bytes for one sequence of ``context`` tokens: KV and conv states (GDN and Mamba2) at ``kv_bytes`` per
    element (2 = bf16), the GDN and Mamba2 recurrent states in fp32. Exactly what :class:`HybridCache` allocates
    per slot."""
    c = config.resolved()
    kv = c.n_attn_layers * 2 * c.n_kv_heads * c.head_dim * context * kv_bytes
    key, val = c.gdn_heads * c.gdn_head_k, c.gdn_v_heads * c.gdn_head_v
    state = c.n_gdn_layers * c.gdn_v_heads * c.gdn_head_k * c.gdn_head_v * 4
    mamba = c.n_mamba_layers * c.mamba_heads * c.mamba_head_dim * c.mamba_state_size * 4
    conv = (c.n_gdn_layers * (2 * key + val) * (c.gdn_conv_size - 1)
            + c.n_mamba_layers * c.mamba_conv_dim * (c.mamba_conv_size - 1)) * kv_bytes
    return {"kv_cache": kv, "gdn_state": state, "mamba_state": mamba, "conv_state": conv,
            "total": kv + state + mamba + conv}


class NoFreeSlotError(RuntimeError):
    """Every slot holds a sequence."""


@dataclass(frozen=True)
class CacheSlice:
    """Rows ``rows`` of ``cache`` as one forward call reads and writes them (see the module docstring)."""

    cache: HybridCache
    rows: slice
    start: int | None = None  # prefill: host position of the first new token of every row
    active: torch.Tensor | None = None  # decode: bool [rows], rows whose state may change (None: all)

    @property
    def num_rows(self) -> int:
        return self.rows.stop - self.rows.start


class HybridCache:
    def __init__(self, config: ModelConfig, num_slots: int, capacity: int, device=None,
                 dtype: torch.dtype = torch.float32):
        if num_slots < 1 or capacity < 1:
            raise ValueError(f"HybridCache needs num_slots >= 1 and capacity >= 1, got {num_slots} and {capacity}")
        self.config, self.num_slots, self.capacity = config.resolved(), num_slots, capacity
        self.device, self.dtype = torch.device(device) if device is not None else torch.device("cpu"), dtype
        c, kw = self.config, dict(device=self.device, dtype=dtype)
        width = c.gdn_conv_size - 1
        key, val = c.gdn_heads * c.gdn_head_k, c.gdn_v_heads * c.gdn_head_v
        self.layers: list[LayerState] = []
        for kind in c.layer_types:
            if kind == ATTN:
                shape = (num_slots, c.n_kv_heads, capacity, c.head_dim)
                self.layers.append(AttnLayerState(torch.zeros(shape, **kw), torch.zeros(shape, **kw)))
            elif kind == MAMBA:
                self.layers.append(Mamba2LayerState(
                    torch.zeros(num_slots, c.mamba_conv_dim, c.mamba_conv_size - 1, **kw),
                    torch.zeros(num_slots, c.mamba_heads, c.mamba_head_dim, c.mamba_state_size, device=self.device,
                                dtype=torch.float32)))
            else:
                self.layers.append(GDNLayerState(
                    torch.zeros(num_slots, key, width, **kw), torch.zeros(num_slots, key, width, **kw),
                    torch.zeros(num_slots, val, width, **kw),
                    torch.zeros(num_slots, c.gdn_v_heads, c.gdn_head_k, c.gdn_head_v, device=self.device,
                                dtype=torch.float32)))
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self._free = list(range(num_slots))

    def nbytes(self) -> int:
        """Bytes of the per-layer state (the lengths are bookkeeping, not counted)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for _, t in layer_tensors(layer))

    # -- slots ----------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Take the lowest free slot, with length 0 (its old state is ignored by a prefill at position 0)."""
        if not self._free:
            raise NoFreeSlotError(f"all {self.num_slots} cache slots are in use")
        slot = heapq.heappop(self._free)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not an allocated slot of this cache")
        self.lengths[slot] = 0
        heapq.heappush(self._free, slot)

    def release_all(self) -> None:
        self.lengths.zero_()
        self._free = list(range(self.num_slots))

    # -- addressing -----------------------------------------------------------------------------------
    def _check_rows(self, rows: slice) -> slice:
        if not (isinstance(rows, slice) and rows.step in (None, 1) and isinstance(rows.start, int)
                and isinstance(rows.stop, int) and 0 <= rows.start < rows.stop <= self.num_slots):
            raise ValueError(f"rows must be a slice a:b with 0 <= a < b <= {self.num_slots}, got {rows!r}")
        return rows

    def for_prefill(self, rows: slice, start: int) -> CacheSlice:
        """Rows ``rows``, each continuing at host position ``start`` (0 starts new sequences there)."""
        if not (isinstance(start, int) and 0 <= start < self.capacity):
            raise ValueError(f"start must be an integer in [0, {self.capacity}), got {start!r}")
        return CacheSlice(self, self._check_rows(rows), start=start)

    def for_decode(self, rows: slice, active: torch.Tensor | None = None) -> CacheSlice:
        """Rows ``rows``, one new token each at that row's length; ``active`` (bool [rows] on the device, None =
        all) selects the rows whose state and length change."""
        rows = self._check_rows(rows)
        if active is not None and (active.dtype != torch.bool or active.shape != (rows.stop - rows.start,)):
            raise ValueError(f"active must be a bool tensor [{rows.stop - rows.start}], got {active.dtype} "
                             f"{list(active.shape)}")
        return CacheSlice(self, rows, active=active)

    def views(self, rows: slice) -> list[LayerState]:
        """Per-layer states restricted to ``rows`` (views: writes land in the cache)."""
        return [type(s)(**{name: t[rows] for name, t in layer_tensors(s)}) for s in self.layers]


def layer_tensors(state: LayerState) -> list[tuple[str, torch.Tensor]]:
    """``(field name, tensor)`` of one layer's state, in declaration order."""
    return [(f.name, getattr(state, f.name)) for f in dataclasses.fields(state)]
