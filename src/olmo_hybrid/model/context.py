"""``ForwardContext``: what every block of one ``HybridLM.forward`` call needs, built once by the model.

Three kinds of call fill it differently (the mixers pick their kernels from it):
- no cache (training, scoring): ``rope``, and for packed documents ``attn_mask`` and ``reset_mask``;
- prefill into cache rows (``start`` set): every row's new tokens begin at the host position ``start``;
  attention reads the cached prefix through ``attn_mask`` (a lower-right causal mask, or None at ``start == 0``);
- decode (``positions`` set): one token per row at per-row device positions, attention over ``lengths`` keys
  per row, and only rows where ``active`` is True (None: all) change their GDN and Mamba2 states.
Everything here is decided on the host without reading device memory, so a decode call never synchronises.
A caller may build the context itself (``HybridLM.forward(context=...)``): context parallelism passes RoPE for its
slice of each sequence and the masks of the whole sequences, which only the op modules it swaps in read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ForwardContext:
    rope: tuple[torch.Tensor, torch.Tensor] | None  # fp32 cos, sin [B, T, head_dim]; None = NoPE
    attn_mask: object | None = None  # SDPA mask ([B, 1, T, S] bool) or causal bias; None = plain causal
    reset_mask: torch.Tensor | None = None  # bool [B, T], True where a document starts; None = no boundary
    start: int | None = None  # prefill: position of the first new token in every cache row
    positions: torch.Tensor | None = None  # decode: long [B], where each row's token goes
    lengths: torch.Tensor | None = None  # decode: long [B] = positions + 1, the keys each row attends to
    active: torch.Tensor | None = None  # decode: bool [B], rows whose state may change; None = all

    @property
    def decoding(self) -> bool:
        return self.positions is not None


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T] SDPA mask for packed documents ``doc_ids`` [B, T]: causal, and inside one document."""
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, None, :] == doc_ids[:, :, None]) & causal)[:, None]
