"""The engine's preallocated cache: a fixed number of sequence slots, each with its own length.

Slot ``s`` owns row ``s`` of every tensor: for attention layers keys and values ``[slots, H_kv, capacity, D]``
(the engine's dtype), for GDN layers the three conv states ``[slots, C, W-1]`` (the engine's dtype) and the
recurrent state ``[slots, HV, K, V]`` (float32). Nothing else is allocated per slot, so the pool's size is
exactly ``slots * ModelConfig.inference_bytes_per_sequence(capacity, kv_bytes)["total"]``.

Rows are handed out lowest first, so running sequences stay packed at the front and a decode step can work
on the prefix ``[0, n)`` of every tensor (views, no gather) with few idle rows in it.
"""

from __future__ import annotations

import heapq

import torch

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.model.cache import AttnLayerCache, GDNLayerCache, allocate_layer_caches, layer_caches_nbytes


class NoFreeSlotError(RuntimeError):
    """Every slot holds a running sequence."""


class SlotCache:
    def __init__(self, config: ModelConfig, num_slots: int, capacity: int, device=None, dtype=torch.bfloat16):
        if num_slots < 1 or capacity < 1:
            raise ValueError(f"SlotCache needs num_slots >= 1 and capacity >= 1, got {num_slots} and {capacity}")
        self.config, self.num_slots, self.capacity = config, num_slots, capacity
        self.device, self.dtype = torch.device(device) if device is not None else torch.device("cpu"), dtype
        self.layers = allocate_layer_caches(config, num_slots, capacity, self.device, dtype)
        self._free = list(range(num_slots))
        self.lengths = [0] * num_slots  # tokens cached per slot (host copy; the engine owns device positions)

    # -- slot management ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Take the lowest free slot, with its GDN state and conv context cleared, and length 0."""
        if not self._free:
            raise NoFreeSlotError(f"all {self.num_slots} cache slots are in use")
        slot = heapq.heappop(self._free)
        for layer in self.layers:
            if isinstance(layer, GDNLayerCache):
                for t in (layer.conv_q, layer.conv_k, layer.conv_v, layer.state):
                    t[slot].zero_()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not an allocated slot of this cache")
        self.lengths[slot] = 0
        heapq.heappush(self._free, slot)

    # -- views ----------------------------------------------------------------------------------------
    def views(self, rows: slice) -> list[AttnLayerCache | GDNLayerCache]:
        """Per-layer caches restricted to ``rows`` (views: writes land in the pool)."""
        out = []
        for layer in self.layers:
            if isinstance(layer, AttnLayerCache):
                out.append(AttnLayerCache(layer.keys[rows], layer.values[rows]))
            else:
                out.append(GDNLayerCache(layer.conv_q[rows], layer.conv_k[rows], layer.conv_v[rows],
                                         layer.state[rows]))
        return out

    def nbytes(self) -> int:
        return layer_caches_nbytes(self.layers)
