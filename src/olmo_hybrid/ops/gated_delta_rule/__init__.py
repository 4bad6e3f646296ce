"""The gated delta rule (GDN's recurrence): public ops in ``api.py``; the PyTorch references (chunked and token
loop) in ``reference.py``; the Triton kernels in ``chunk_fwd.py``, ``chunk_bwd.py`` (helpers both use in
``chunk_common.py``) and ``step_kernel.py``; their ``torch.library`` custom ops in ``custom_ops.py``."""

from .api import gated_delta_rule, gated_delta_rule_step, recurrent_gated_delta_rule

__all__ = ["gated_delta_rule", "gated_delta_rule_step", "recurrent_gated_delta_rule"]
