"""Forward passes of a ``HybridLM`` against the slot cache: chunked prefill of one slot, batched decode.

Prefill runs the model's own blocks on a one-row view of the cache (a chunk at a time; later chunks attend
to earlier ones through a lower-right causal mask). Decode feeds one token per row for rows ``[0, n)`` at
per-row positions: every block runs unchanged on the row views; attention writes each row's key and value at that
row's own position (``StepContext.start`` as a tensor). Rows of free slots inside
``[0, n)`` compute garbage into their own (free) rows, which the next allocation resets.

On CUDA, decode attention runs ``ops.decode_attention`` (a split-KV Triton kernel), which reads each row's length on
the device: one CUDA graph serves every context length and reads only the keys each row needs. Elsewhere it is
SDPA over ``span`` keys, with a mask unless every used row is at ``span - 1``.
"""

from __future__ import annotations

import torch

from olmo_hybrid import ops

from olmo_hybrid.model.hybrid import HybridLM, StepContext
from olmo_hybrid.model.layers import rotary_cos_sin
from olmo_hybrid.serve.slots import SlotCache


def _lower_right_causal(queries: int, keys: int):
    """Causal mask whose diagonal ends at the last key, as a bias object SDPA can run with flash attention."""
    # Imported here: torch.nn.attention.bias imports triton, which only olmo_hybrid.ops may pull in eagerly.
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(queries, keys)


class ModelRunner:
    """Runs ``model`` against ``cache``; knows nothing about requests or scheduling."""

    def __init__(self, model: HybridLM, cache: SlotCache):
        self.model, self.cache, self.config = model, cache, model.config
        self.use_rope = self.config.rope_theta is not None and self.config.n_attn_layers > 0
        # On CUDA the per-row lengths stay on the device (ops.decode_attention); elsewhere SDPA over ``span`` keys.
        self.decode_kernel = ops.decode_attention if cache.device.type == "cuda" else None

    def _rope(self, positions: torch.Tensor):
        return rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta) if self.use_rope else None

    @torch.no_grad()
    def prefill(self, slot: int, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        """Append ``ids`` [T] to ``slot`` (chunks of ``chunk`` tokens); returns the last token's logits [V] fp32."""
        m, cache = self.model, self.cache
        views = cache.views(slice(slot, slot + 1))
        start, total = cache.lengths[slot], ids.shape[0]
        if start + total > cache.capacity:
            raise ValueError(f"slot {slot} holds {cache.capacity} tokens; {start} used, {total} more requested")
        h = None
        for s in range(0, total, chunk):
            piece = ids[None, s:s + chunk]
            t, pos0 = piece.shape[1], start + s
            positions = torch.arange(pos0, pos0 + t, device=ids.device)[None]
            # The model's attention uses plain causal SDPA when the mask is None, which is right only when the
            # chunk starts the sequence; later chunks need the diagonal shifted to the chunk's offset.
            mask = None if pos0 == 0 else _lower_right_causal(t, pos0 + t)
            step = StepContext(rope=self._rope(positions), attn_mask=mask, reset_mask=None, start=pos0)
            h = m.model.embed_tokens(piece)
            for layer, view in zip(m.model.layers, views):
                h = layer(h, step, view)
        cache.lengths[slot] = start + total
        return m.lm_head(m.model.norm(h[:, -1]))[0].float()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, span: int | None = None,
               uniform: bool = False) -> torch.Tensor:
        """One step for rows ``[0, n)``: tokens [n] at positions [n] (each < ``span`` <= capacity); logits [n, V] fp32.

        ``span`` and ``uniform`` matter only without the decode kernel: SDPA then reads ``span`` keys per row,
        and ``uniform=True`` promises that every row whose logits are used is at ``span - 1`` (no mask). Host
        lengths are not touched (the engine owns them): this is a pure function of device tensors, CUDA-graph safe.
        """
        m = self.model
        n = tokens.shape[0]
        rows = slice(0, n)
        rope = self._rope(positions[:, None])
        key_mask = attend = None
        if self.decode_kernel is not None:
            lengths = positions + 1
            kernel = self.decode_kernel

            def attend(q, keys, values):
                return kernel(q, keys, values, lengths)
        elif not uniform:
            key_mask = (torch.arange(span, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
        step = StepContext(rope=rope, attn_mask=key_mask, reset_mask=None, start=positions, span=span, attend=attend)
        h = m.model.embed_tokens(tokens[:, None])
        for layer, view in zip(m.model.layers, self.cache.views(rows)):
            h = layer(h, step, view)
        return m.lm_head(m.model.norm(h[:, 0])).float()
