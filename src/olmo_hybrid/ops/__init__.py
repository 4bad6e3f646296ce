"""Sequence-mixing ops: the GDN layer's gated delta rule and short causal conv, the Mamba2 layer's SSD scan, and
the serving engine's decode attention, each with a PyTorch reference and Triton kernels.

    from olmo_hybrid import ops
    o, state = ops.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, reset_mask=reset)
    with ops.use_backend("torch"):           # the references, for every op called inside
        ...

One folder per op (``gated_delta_rule/``, ``short_conv/``, ``ssd/``, ``decode_attention/``), each with its public functions
(``api.py``), reference, kernels and custom ops side by side; ``dispatch.py`` holds the (op, backend) table,
and the GDN and SSD ops take a :class:`KernelSettings` (``olmo_hybrid.config``, part of the model config) as
``settings=``. Importing this package imports
neither triton nor fla. The public functions shadow the subpackages of the same name as attributes of this
package: import submodules by their full path (``from olmo_hybrid.ops.gated_delta_rule import reference``).
"""

from .decode_attention import decode_attention
from .dispatch import BackendUnavailableError, available_backends, current_backend, use_backend
from .gated_delta_rule import gated_delta_rule, gated_delta_rule_step, recurrent_gated_delta_rule
from .gated_delta_rule.reference import l2norm
from olmo_hybrid.config import KernelSettings
from .short_conv import causal_conv1d, causal_conv1d_step
from .ssd import recurrent_ssd, ssd, ssd_step
from .varlen import reset_mask_from_doc_ids

__all__ = [
    "BackendUnavailableError",
    "KernelSettings",
    "available_backends",
    "causal_conv1d",
    "causal_conv1d_step",
    "current_backend",
    "decode_attention",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "l2norm",
    "recurrent_gated_delta_rule",
    "recurrent_ssd",
    "reset_mask_from_doc_ids",
    "ssd",
    "ssd_step",
    "use_backend",
]
