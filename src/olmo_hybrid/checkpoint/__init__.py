"""Checkpoints and run directories: layout and validation, the run lock, sharded save and verified restore,
Hugging Face export and conversion, and one loader for every kind of checkpoint a user has.

Public API (import from ``olmo_hybrid.checkpoint``)::

    load_model_and_tokenizer(path, device="cpu", dtype=None, tokenizer=None, require_tokenizer=True, step=None)
        -> (HybridLM in eval mode, Tokenizer | None)       HF directory or run directory
    read_model_config(path) -> ModelConfig                  without loading weights
    convert_checkpoint(src, dst, dtype=None, overwrite=False, max_shard_bytes=) -> (model, tokenizer, dtype)
    export_hf(run_dir, model, tokenizer) -> Path            RUN/hf, swapped in whole; never non-finite weights
    save_checkpoint(run_dir, step, model=, optimizer=, train_state=, config=, rank_state=, keep_last_k=, env=)
    restore_checkpoint(path, model=, optimizer=, env=, log=) -> train state   verified (checksums, finite)
    restore_newest(run_dir, model=, optimizer=, env=, log=) -> (CheckpointInfo, state) | None   with fallback
    load_model_weights(path, model, env=None)
    list_checkpoints(run_dir, valid_only=True), latest_checkpoint(run_dir, log=print) -> CheckpointInfo | None
    validate_checkpoint(path, checksums=False, env=None) -> reason | None
    check_run_dir(run_dir, resume=False, overwrite=False); check_model_config(path, model_dict)
    RunLock(run_dir, log=print)                             context manager; names a live holder's pid and host
    nonfinite_tensors(model, optimizer=None, env=None) -> [names]
    is_hf_dir(path), is_run_dir(path), read_run_config(path), checkpoints_dir(run_dir)
    CheckpointError, DivergenceError, WriteError            (olmo_hybrid.errors)
"""

from olmo_hybrid.checkpoint.export import check_convert_destination, convert_checkpoint, export_hf, write_hf_dir
from olmo_hybrid.checkpoint.load import load_model_and_tokenizer, read_model_config, stored_dtype
from olmo_hybrid.checkpoint.lock import RunLock
from olmo_hybrid.checkpoint.run_dir import (CHECKPOINTS, CONFIG, HF_EXPORT, LOCK, MANIFEST, METRICS, CheckpointInfo,
                                            check_model_config, check_run_dir, checkpoints_dir, is_hf_dir,
                                            is_run_dir, latest_checkpoint, list_checkpoints, model_config_diff,
                                            read_checkpoint_world_size, read_run_config, validate_checkpoint)
from olmo_hybrid.checkpoint.state import (DCP_DIR, load_model_weights, nonfinite_tensors, restore_checkpoint,
                                          restore_newest, save_checkpoint, summarize_names)
from olmo_hybrid.errors import CheckpointError, DivergenceError, WriteError

__all__ = [
    "CHECKPOINTS", "CONFIG", "DCP_DIR", "HF_EXPORT", "LOCK", "MANIFEST", "METRICS", "CheckpointError", "CheckpointInfo",
    "DivergenceError", "RunLock", "WriteError", "check_convert_destination", "check_model_config", "check_run_dir",
    "checkpoints_dir", "convert_checkpoint", "export_hf", "is_hf_dir", "is_run_dir", "latest_checkpoint",
    "list_checkpoints", "load_model_and_tokenizer", "load_model_weights", "model_config_diff", "nonfinite_tensors",
    "read_checkpoint_world_size", "read_model_config", "read_run_config", "restore_checkpoint", "restore_newest",
    "save_checkpoint", "stored_dtype", "summarize_names", "validate_checkpoint", "write_hf_dir",
]
