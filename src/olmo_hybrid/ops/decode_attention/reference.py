"""Pure-PyTorch decode attention: one query per row over the first ``lengths[b]`` keys of that row's cache.

The "torch" backend of ``olmo_hybrid.ops.decode_attention`` (``api.py`` checks the arguments): SDPA with a key mask,
in float32 (float64 for float64 inputs), output in q's dtype. The serving engine's decode step calls this op with
per-row lengths that live on the device, so that one CUDA graph serves every context length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F



def decode_attention_torch(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                           scale: float) -> torch.Tensor:
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // keys.shape[1]
    k = keys.to(compute).repeat_interleave(group, dim=1)
    v = values.to(compute).repeat_interleave(group, dim=1)
    mask = torch.arange(keys.shape[2], device=q.device)[None, :] < lengths[:, None].to(q.device)
    o = F.scaled_dot_product_attention(q.to(compute), k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return o.to(q.dtype)

