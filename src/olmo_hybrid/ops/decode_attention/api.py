"""Decode attention's public op: argument checks, documentation and the call into the chosen backend
(``olmo_hybrid/ops/dispatch.py``)."""

from __future__ import annotations

from ..checks import check_float, check_shape
from ..dispatch import select


def decode_attention(q, keys, values, lengths, scale=None, *, backend=None):
    """Softmax attention of one query per row over the first ``lengths[b]`` cached keys of row b.

    q: [B, H, 1, D]. keys, values: [B, Hkv, capacity, D], H a multiple of Hkv (grouped queries); any strides,
    e.g. rows of a larger cache pool. lengths: integer [B] on q's device, each in [1, capacity] (not checked:
    that would synchronise with the device). scale: default D ** -0.5. Returns [B, H, 1, D] in q's dtype.
    The Triton backend reads ``lengths`` on the device and is safe to capture in a CUDA graph.
    backend: "auto" | "torch" | "triton", or None for the enclosing ``ops.use_backend`` (else "auto").
    """
    op = "decode_attention"
    check_float(op, q=q, keys=keys, values=values)
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"{op}: q must have shape [B, H, 1, D], got {list(q.shape)}")
    B, H, _, D = q.shape
    if keys.dim() != 4 or keys.shape[0] != B or keys.shape[3] != D or H % keys.shape[1]:
        raise ValueError(f"{op}: keys must have shape [B={B}, Hkv, capacity, D={D}] with H={H} a multiple of Hkv, "
                         f"got {list(keys.shape)}")
    check_shape(op, "values", values, keys.shape, "[B, Hkv, capacity, D] (as keys)")
    if lengths.shape != (B,) or lengths.is_floating_point() or lengths.is_complex():
        raise ValueError(f"{op}: lengths must be an integer tensor [B={B}], got {lengths.dtype} {list(lengths.shape)}")
    args = dict(q=q, keys=keys, values=values, lengths=lengths, scale=D ** -0.5 if scale is None else float(scale))
    return select(op, backend, q.device, args)(**args)
