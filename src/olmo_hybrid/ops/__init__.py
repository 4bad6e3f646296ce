"""Sequence-mixing ops: the GDN layer's gated delta rule and short causal conv, and the serving engine's
decode attention, with backend dispatch.

    from olmo_hybrid.ops import gated_delta_rule, causal_conv1d
    o, state = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, reset_mask=reset)

Each op takes ``backend`` ("auto", "torch", "triton", "fla"; None = the default set by :func:`set_backend`).
See ``api.py`` for layouts and document-boundary semantics, ``backend.py`` for registering kernels.
"""

from .api import (
    causal_conv1d,
    causal_conv1d_step,
    decode_attention,
    gated_delta_rule,
    gated_delta_rule_step,
    recurrent_gated_delta_rule,
)
from .backend import BackendUnavailableError, available_backends, get_backend, register, set_backend
from .gdn_reference import l2norm
from .varlen import reset_mask_from_doc_ids

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "causal_conv1d",
    "causal_conv1d_step",
    "decode_attention",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "get_backend",
    "l2norm",
    "recurrent_gated_delta_rule",
    "register",
    "reset_mask_from_doc_ids",
    "set_backend",
]
