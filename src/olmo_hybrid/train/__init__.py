"""Pretraining: config and presets, AdamW + schedules, and the trainer loop (checkpoints: ``olmo_hybrid.checkpoint``).

Only the command that trains imports this package (``olmo-hybrid train``, ``python -m olmo_hybrid.train``);
loading what a run produced goes through ``olmo_hybrid.checkpoint.load_model_and_tokenizer``.

Public API::

    TrainConfig, OptimConfig, ScheduleConfig, TrainerConfig, ParallelConfig
                                                                dataclasses (``data`` is olmo_hybrid.data.DataConfig)
    build_config(config_file=None, overrides=(), preset="tiny", model=None) -> TrainConfig
    train_preset(name) -> TrainConfig;  TRAIN_PRESETS
    train(cfg, run_dir, resume=False, overwrite=False) -> TrainResult   the whole run (also ``olmo-hybrid train``)
    Trainer(cfg, run_dir, resume=False, overwrite=False)        .fit(), .train_step(), .validate(), .save()
    lr_at(step, total_steps, peak_lr, schedule_cfg) -> float; param_groups(model, wd, rule)
    read_metrics(path) -> list[dict];  read_back(step_outputs) -> list[dict]

Speed and scale (``torchrun --nproc-per-node=N -m olmo_hybrid.train ...``)::

    parallelize(model, env, ac=, ac_every=, compile=, dp_replicate=, dp_shard=, cp_degree=, cp_mode=, param_dtype=)
                                                                CP -> AC -> compile -> FSDP2 (``parallel.py``)
    context parallelism: ``context_parallel.py`` (Ulysses, conv halos), ``state_passing.py``, ``cp_comm.py``
    chunked_lm_loss(hidden, weight, labels, z_coef, scale, chunk_tokens)
"""

from olmo_hybrid.train.config import (TRAIN_PRESETS, OptimConfig, ParallelConfig, ScheduleConfig, TrainConfig,
                                      TrainerConfig, build_config, train_preset)
from olmo_hybrid.train.loss import chunked_lm_loss
from olmo_hybrid.train.metrics import read_back, read_metrics
from olmo_hybrid.train.optim import lr_at, param_groups
from olmo_hybrid.train.parallel import parallelize
from olmo_hybrid.train.trainer import Trainer, TrainResult, train

__all__ = [
    "OptimConfig", "ParallelConfig", "ScheduleConfig", "TRAIN_PRESETS", "TrainConfig", "TrainResult", "Trainer",
    "TrainerConfig", "build_config", "chunked_lm_loss", "lr_at", "param_groups", "parallelize", "read_back",
    "read_metrics", "train", "train_preset",
]
