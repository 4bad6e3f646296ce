"""Serving ``HybridLM``: the generation engine (defined in ``olmo_hybrid.model.engine``, which ``HybridLM.generate``
also runs on) and, here, what serving adds on top of it.

    from olmo_hybrid.serve import Engine, SamplingParams
    engine = Engine(model, max_batch=8, max_context=4096)
    outputs = engine.generate(list_of_prompt_ids, max_new_tokens=64)
"""

from olmo_hybrid.model.engine import Engine, EngineStats, RequestOutput
from olmo_hybrid.model.memory import MemoryBudgetError, max_sequences
from olmo_hybrid.model.sampling import SamplingParams
from olmo_hybrid.serve.verify import Disagreement, greedy_disagreements

__all__ = ["Disagreement", "Engine", "EngineStats", "MemoryBudgetError", "RequestOutput", "SamplingParams",
           "greedy_disagreements", "max_sequences"]
