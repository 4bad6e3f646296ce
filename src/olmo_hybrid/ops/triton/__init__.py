"""Triton kernels for the GDN layer's ops: the "triton" backend of ``olmo_hybrid.ops``.

Importing this package (the dispatcher does it lazily) registers the kernels with ``olmo_hybrid.ops.backend``
and defines the ``torch.ops.olmo_hybrid.*`` custom ops. Without a CUDA device the kernels run in Triton's CPU
interpreter (see ``_interpret.py``): slow, for tests. Besides the registered ops, in-place decode updates:
:func:`gated_delta_rule_step_inplace` and :func:`causal_conv1d_step_inplace`.
"""

from ._interpret import setup as _setup

_setup()

from ..backend import register  # noqa: E402
from .conv_ops import (  # noqa: E402
    causal_conv1d_step_inplace,
    causal_conv1d_step_triton,
    causal_conv1d_triton,
    supports_conv,
    supports_conv_step,
)
from .decode_attention import decode_attention_triton, supports_decode_attention  # noqa: E402
from .gdn import (  # noqa: E402
    gated_delta_rule_step_inplace,
    gated_delta_rule_step_triton,
    gated_delta_rule_triton,
    supports_chunk,
    supports_step,
)

register("gated_delta_rule", "triton", gated_delta_rule_triton, supports=supports_chunk)
register("gated_delta_rule_step", "triton", gated_delta_rule_step_triton, supports=supports_step)
register("causal_conv1d", "triton", causal_conv1d_triton, supports=supports_conv)
register("causal_conv1d_step", "triton", causal_conv1d_step_triton, supports=supports_conv_step)
register("decode_attention", "triton", decode_attention_triton, supports=supports_decode_attention)

__all__ = ["causal_conv1d_step_inplace", "gated_delta_rule_step_inplace"]
