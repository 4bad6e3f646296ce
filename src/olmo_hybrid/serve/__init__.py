"""Fast generation for ``HybridLM``: slot cache, chunked prefill, batched decode, continuous batching.

    from olmo_hybrid.serve import Engine, SamplingParams
    engine = Engine(model, max_batch=8, max_context=4096)
    outputs = engine.generate(list_of_prompt_ids, max_new_tokens=64)
"""

from olmo_hybrid.serve.engine import Engine, EngineStats, RequestOutput
from olmo_hybrid.serve.memory import MemoryBudgetError, max_sequences, sequence_bytes
from olmo_hybrid.serve.sampling import SamplingParams
from olmo_hybrid.serve.slots import SlotCache
from olmo_hybrid.serve.verify import Disagreement, greedy_disagreements

__all__ = ["Disagreement", "Engine", "EngineStats", "MemoryBudgetError", "RequestOutput", "SamplingParams",
           "SlotCache", "greedy_disagreements", "max_sequences", "sequence_bytes"]
