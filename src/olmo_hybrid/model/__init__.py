"""The hybrid model: ``HybridLM`` (GDN, attention and Mamba2 blocks), its cache, the generation engine and HF I/O."""

from olmo_hybrid.model.cache import HybridCache
from olmo_hybrid.model.hybrid import HybridLM

__all__ = ["HybridCache", "HybridLM"]
