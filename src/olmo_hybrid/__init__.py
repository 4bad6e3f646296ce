"""olmo-hybrid: hybrid Gated DeltaNet / attention language models (OLMo Hybrid), from data to serving."""

__version__ = "0.1.0"
