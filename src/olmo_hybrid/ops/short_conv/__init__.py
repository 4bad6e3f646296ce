"""The short causal depthwise convolution of a GDN layer: public ops in ``api.py``, the PyTorch reference in
``reference.py``, the Triton kernels in ``kernels.py`` and their ``torch.library`` custom ops in
``custom_ops.py``."""

from .api import causal_conv1d, causal_conv1d_step

__all__ = ["causal_conv1d", "causal_conv1d_step"]
