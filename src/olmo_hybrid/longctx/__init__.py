"""Long context: extend a trained model's window as OLMo Hybrid did, and measure it with RULER over lengths.

Public API (import from ``olmo_hybrid.longctx``; the commands are ``olmo-hybrid extend`` and
``olmo-hybrid longctx-experiment``)::

    METHODS = ("yarn", "drope", "none")
    drop_rope(model_config) -> ModelConfig                    DRoPE: no positional encoding in any attention layer
    extended_config(model_config, method, seq_len, original_len) -> ModelConfig
    plan_extension(source, method, seq_len, steps=/tokens=, train_len=, recalibrate=, overrides=) -> ExtendPlan
    extend(source, out, method, seq_len, ...) -> TrainResult  the stage, on the trainer (resumable)
    estimate_training_memory(train_config, device_type, world_size) -> MemoryEstimate;  check_fits(...)
    ExperimentConfig; run_experiment(config_path) ...         the hybrid-vs-transformer RULER experiment
"""

from olmo_hybrid.longctx.extend import EXTEND_RECORD, ExtendPlan, extend, plan_extension, read_extend_record
from olmo_hybrid.longctx.memory import MemoryEstimate, check_fits, estimate_training_memory
from olmo_hybrid.longctx.methods import METHODS, describe_positions, drop_rope, extended_config

__all__ = [
    "EXTEND_RECORD", "METHODS", "ExtendPlan", "MemoryEstimate", "check_fits", "describe_positions", "drop_rope",
    "estimate_training_memory", "extend", "extended_config", "plan_extension", "read_extend_record",
]
