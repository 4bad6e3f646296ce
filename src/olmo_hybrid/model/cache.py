"""The hybrid inference cache: a KV cache for attention layers, conv + fp32 recurrent state for GDN layers.

Attention layers need every past key and value, so their cache grows with the context; GDN layers keep
a fixed-size state (``[HV, K, V]`` fp32 per sequence) plus the last ``W - 1`` pre-convolution inputs.
The KV tensors are allocated once for ``max_len`` tokens, so a request that cannot fit fails at
allocation time rather than midway through generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from olmo_hybrid.config import ATTN, ModelConfig


@dataclass
class AttnLayerCache:
    keys: torch.Tensor  # [B, H_kv, max_len, D]
    values: torch.Tensor  # [B, H_kv, max_len, D]


@dataclass
class GDNLayerCache:
    conv_q: torch.Tensor  # [B, H*K, W-1] last pre-conv inputs
    conv_k: torch.Tensor  # [B, H*K, W-1]
    conv_v: torch.Tensor  # [B, HV*V, W-1]
    state: torch.Tensor  # [B, HV, K, V] fp32


def allocate_layer_caches(config: ModelConfig, batch: int, max_len: int, device=None,
                          dtype=torch.float32) -> list[AttnLayerCache | GDNLayerCache]:
    """Zeroed per-layer caches for ``batch`` rows: KV in ``dtype`` for ``max_len`` tokens, conv in ``dtype``,
    recurrent state in fp32 (exactly ``ModelConfig.inference_bytes_per_sequence`` per row)."""
    c = config
    w = c.gdn_conv_size - 1
    key, val = c.gdn_heads * c.gdn_head_k, c.gdn_value_heads * c.gdn_head_v
    kw = dict(device=device, dtype=dtype)
    layers: list[AttnLayerCache | GDNLayerCache] = []
    for kind in c.layer_types:
        if kind == ATTN:
            shape = (batch, c.kv_heads, max_len, c.head_dim)
            layers.append(AttnLayerCache(torch.zeros(shape, **kw), torch.zeros(shape, **kw)))
        else:
            layers.append(GDNLayerCache(
                torch.zeros(batch, key, w, **kw), torch.zeros(batch, key, w, **kw), torch.zeros(batch, val, w, **kw),
                torch.zeros(batch, c.gdn_value_heads, c.gdn_head_k, c.gdn_head_v, device=device, dtype=torch.float32),
            ))
    return layers


def layer_caches_nbytes(layers: list[AttnLayerCache | GDNLayerCache]) -> int:
    return sum(t.numel() * t.element_size() for layer in layers for t in vars(layer).values())


class HybridCache:
    """Per-layer caches plus the bookkeeping shared by all layers.

    ``doc_ids`` records, for every cached position, which segment it belongs to (0 for left padding,
    1 for the prompt and generated tokens); attention only looks at keys of the query's own segment and
    GDN layers reset their state where the segment changes, so a left-padded row computes exactly what
    the unpadded prompt would.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        self.config, self.batch_size, self.max_len = config, batch_size, max_len
        self.length = 0
        self.doc_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.last_doc = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        self.layers = allocate_layer_caches(config, batch_size, max_len, device, dtype)

    def nbytes(self) -> int:
        return self.doc_ids.numel() * self.doc_ids.element_size() + layer_caches_nbytes(self.layers)

    def begin(self, doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Register the segment ids of ``T`` new tokens; returns (reset mask [B, T], start position)."""
        t = doc_ids.shape[1]
        if self.length + t > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; {self.length} used, {t} more requested")
        start = self.length
        self.doc_ids[:, start:start + t] = doc_ids
        prev = torch.cat([self.last_doc[:, None], doc_ids[:, :-1]], dim=1)
        return doc_ids != prev, start

    def end(self, doc_ids: torch.Tensor) -> None:
        self.length += doc_ids.shape[1]
        self.last_doc = doc_ids[:, -1].clone()
