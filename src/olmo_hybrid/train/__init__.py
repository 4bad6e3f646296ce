"""Pretraining: config and presets, AdamW + schedules, the trainer loop, and checkpoints.

Public API::

    TrainConfig, OptimConfig, ScheduleConfig, TrainerConfig, ParallelConfig
                                                                dataclasses (``data`` is olmo_hybrid.data.DataConfig)
    build_config(config_file=None, overrides=(), preset="tiny", model=None) -> TrainConfig
    train_preset(name) -> TrainConfig;  TRAIN_PRESETS
    train(cfg, run_dir, resume=False) -> TrainResult            the whole run (also ``olmo-hybrid train``)
    Trainer(cfg, run_dir, resume=False)                         .fit(), .train_step(), .validate(), .save()
    lr_at(step, total_steps, peak_lr, schedule_cfg) -> float; param_groups(model, wd, rule)
    load_model_from_run(run_dir, device="cpu", step=None) -> HybridLM (eval mode)
    tokenizer_file_of_run(run_dir) -> Path;  model_config_from_run(run_dir) -> ModelConfig
    latest_checkpoint(run_dir), list_checkpoints(run_dir), CheckpointError
    read_metrics(path) -> list[dict]

Speed and scale (``torchrun --nproc-per-node=N -m olmo_hybrid.train ...``)::

    parallelize(model, env, ac=, ac_every=, compile=, dp_replicate=, dp_shard=, param_dtype=)  AC -> compile -> FSDP2
    init_distributed(device) -> DistEnv;  chunked_lm_loss(hidden, weight, labels, z_coef, scale, chunk_tokens)
"""

from olmo_hybrid.train.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints,
                                          load_model_from_run, model_config_from_run, tokenizer_file_of_run)
from olmo_hybrid.train.config import (TRAIN_PRESETS, OptimConfig, ParallelConfig, ScheduleConfig, TrainConfig,
                                      TrainerConfig, build_config, train_preset)
from olmo_hybrid.train.distributed import DistEnv, init_distributed
from olmo_hybrid.train.loss import chunked_lm_loss
from olmo_hybrid.train.metrics import read_metrics
from olmo_hybrid.train.optim import lr_at, param_groups
from olmo_hybrid.train.parallel import parallelize
from olmo_hybrid.train.trainer import Trainer, TrainResult, train

__all__ = [
    "CheckpointError", "DistEnv", "OptimConfig", "ParallelConfig", "chunked_lm_loss", "init_distributed",
    "parallelize", "ScheduleConfig", "TRAIN_PRESETS", "TrainConfig", "TrainResult", "Trainer",
    "TrainerConfig", "build_config", "latest_checkpoint", "list_checkpoints", "load_model_from_run", "lr_at", "model_config_from_run",
    "param_groups", "read_metrics", "tokenizer_file_of_run", "train", "train_preset",
]
