"""Decode attention over a slot cache with per-row lengths on the device: public op in ``api.py``, the PyTorch
reference in ``reference.py``, the split-KV Triton kernel in ``kernel.py``."""

from .api import decode_attention

__all__ = ["decode_attention"]
