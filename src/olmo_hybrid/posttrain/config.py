"""Post-training configs: the trainer's config plus a chat section and a recipe section, with the recipes of
OLMo Hybrid's post-training (Merrill et al. 2026, arXiv:2604.03444) as defaults.

``SFTConfig`` and ``DPOConfig`` extend ``TrainConfig`` (same optim / schedule / trainer / parallel sections,
same dotted overrides and errors); ``data`` describes conversations or pairs instead of a token stream.
The model comes from the source checkpoint, and the number of steps and warmup follow from the recipe's
epochs and warmup fraction once the data are packed, so ``model.*``, ``trainer.steps`` and
``schedule.warmup_steps`` are not set by hand (``*.max_steps`` stops a run early).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from olmo_hybrid.config import apply_overrides, from_dict, read_json_object, to_dict
from olmo_hybrid.errors import ConfigError
from olmo_hybrid.posttrain.examples import TRUNCATION
from olmo_hybrid.posttrain.losses import LOSSES
from olmo_hybrid.train.config import OptimConfig, ScheduleConfig, TrainConfig, TrainerConfig

REFERENCES = ("precomputed", "model")
DERIVED = ("trainer.steps", "schedule.warmup_steps")


@dataclass
class PostTrainDataConfig:
    path: str = ""  # conversations / pairs: a JSONL file or a datasets dataset (the positional DATA)
    split: str = "train"  # split of a datasets dataset
    val_path: str = ""  # held-out examples; default: val_fraction of path
    val_fraction: float = 0.05  # at least one example
    seq_len: int = 0  # row length (SFT: packed conversations; DPO: chosen + rejected); 0: the recipe's, capped by the model
    batch_size: int = 8  # rows per rank per micro-batch (DPO: pairs)
    seed: int = 0  # which examples are held out, the packing order and every epoch's row order
    truncation: str = "truncate"  # truncate | drop | error, for examples longer than seq_len

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction: must be in [0, 1), got {self.val_fraction!r}")
        if self.seq_len < 0 or self.batch_size <= 0:
            raise ConfigError(f"data.seq_len must be >= 0 and data.batch_size positive, got "
                              f"{self.seq_len} and {self.batch_size}")
        if self.truncation not in TRUNCATION:
            raise ConfigError(f"data.truncation: expected one of {', '.join(TRUNCATION)}, got {self.truncation!r}")


@dataclass
class ChatConfig:
    template: str = ""  # a .jinja file or a Jinja string; "": the source tokenizer's own template, else ours


@dataclass
class SFTRecipe:
    epochs: float = 2.0
    warmup_fraction: float = 0.03  # of the steps, linear from 0
    max_steps: int = 0  # > 0: stop after this many steps (the schedule spans them)
    seq_len: int = 32768  # data.seq_len when that is 0 (capped by the model's max_seq_len)


@dataclass
class DPORecipe:
    loss: str = "dpo_norm"  # dpo (summed log-probs) | dpo_norm (per-token means), see losses.py
    beta: float = 5.0
    reference: str = "precomputed"  # precomputed: reference log-probs computed once and stored; model: a frozen copy
    epochs: float = 1.0
    warmup_fraction: float = 0.1
    max_steps: int = 0
    seq_len: int = 16384


def _check_recipe(r, name: str) -> None:
    if not r.epochs > 0:
        raise ConfigError(f"{name}.epochs must be positive, got {r.epochs}")
    if not 0 <= r.warmup_fraction < 1:
        raise ConfigError(f"{name}.warmup_fraction must be in [0, 1), got {r.warmup_fraction}")
    if r.max_steps < 0:
        raise ConfigError(f"{name}.max_steps must be >= 0 (0: no limit), got {r.max_steps}")
    if r.seq_len <= 0:
        raise ConfigError(f"{name}.seq_len must be positive, got {r.seq_len}")


def _trainer(**overrides) -> TrainerConfig:
    # No z-loss and no end-of-run sample by default (sample_prompt is sent as one user turn when asked for).
    return TrainerConfig(**{"z_loss": 0.0, "sample_tokens": 0, "eval_interval": 50, "save_interval": 100,
                            **overrides})


@dataclass
class PostTrainConfig(TrainConfig):
    """What SFT and DPO share: conversations or pairs as data, a linear schedule to 0, no weight decay, the
    chat template. ``recipe`` is the subclass's own section."""

    data: PostTrainDataConfig = field(default_factory=PostTrainDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="linear", final_lr_fraction=0.0))
    trainer: TrainerConfig = field(default_factory=_trainer)
    chat: ChatConfig = field(default_factory=ChatConfig)

    def validate(self) -> None:
        if self.parallel.cp_degree > 1:  # first: the trainer's own context-parallel checks would not apply
            raise ConfigError(f"parallel.cp_degree={self.parallel.cp_degree}: post-training does not split its "
                              "packed rows over context-parallel ranks; use cp_degree=1 (data parallelism works)")
        super().validate()
        _check_recipe(self.recipe, self.recipe_name)

    @property
    def recipe_name(self) -> str:
        return "sft" if isinstance(self, SFTConfig) else "dpo"

    @property
    def recipe(self) -> SFTRecipe | DPORecipe:
        return getattr(self, self.recipe_name)


@dataclass
class SFTConfig(PostTrainConfig):
    # paper: lr 2.5e-5, 3% warmup; ours: linear decay to 0 and no weight decay (open-instruct's SFT defaults)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2.5e-5, weight_decay=0.0))
    sft: SFTRecipe = field(default_factory=SFTRecipe)


@dataclass
class DPOConfig(PostTrainConfig):
    # paper: lr 1e-6, linear schedule, 10% warmup, weight decay 0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.0))
    dpo: DPORecipe = field(default_factory=DPORecipe)

    def validate(self) -> None:
        super().validate()
        if self.dpo.loss not in LOSSES:
            raise ConfigError(f"dpo.loss: expected one of {', '.join(LOSSES)}, got {self.dpo.loss!r}")
        if self.dpo.reference not in REFERENCES:
            raise ConfigError(f"dpo.reference: expected one of {', '.join(REFERENCES)}, got {self.dpo.reference!r}")
        if not self.dpo.beta > 0:
            raise ConfigError(f"dpo.beta must be positive, got {self.dpo.beta}")
        if self.trainer.loss_chunk_tokens:
            raise ConfigError("trainer.loss_chunk_tokens: DPO needs every token's log-probability; it is not "
                              "supported for DPO (leave it 0)")


def build_posttrain_config(kind: type[SFTConfig] | type[DPOConfig], config_file=None, overrides=()):
    """The recipe's defaults, then a (partial) JSON file, then dotted overrides; ``model.*`` and the derived
    fields are refused (the model is the source's, steps and warmup come from the recipe)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("model.") or key == "model":
            raise ConfigError(f"{key}: the model is the source checkpoint's and cannot be overridden")
        if key in DERIVED:
            section = kind().recipe_name
            raise ConfigError(f"{key} is derived from {section}.epochs and {section}.warmup_fraction; set those "
                              f"(or {section}.max_steps to stop early) instead")
    cfg = kind()
    if config_file is not None:
        data = read_json_object(config_file)
        if "model" in data:
            raise ConfigError(f"config file {config_file}: a 'model' section is not allowed (the model is the source's)")
        merged = to_dict(cfg)
        for section, values in data.items():
            if not isinstance(values, dict) or section not in merged:
                raise ConfigError(f"config file {config_file}: unknown or malformed section {section!r}")
            merged[section].update(values)
        cfg = from_dict(kind, merged)
    return apply_overrides(cfg, list(overrides))


def with_source_model(cfg, model_config):
    """``cfg`` with the source checkpoint's model and ``data.seq_len`` resolved (0: the recipe's length, capped
    by the model's ``max_seq_len``)."""
    seq_len = cfg.data.seq_len or min(cfg.recipe.seq_len, model_config.max_seq_len)
    if model_config.n_attn_layers and seq_len > model_config.max_seq_len:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the source model's max_seq_len={model_config.max_seq_len}")
    return dataclasses.replace(cfg, model=model_config, data=dataclasses.replace(cfg.data, seq_len=seq_len))


def set_steps(cfg, steps_per_epoch: int) -> None:
    """Set ``trainer.steps`` and ``schedule.warmup_steps`` from the recipe, in place: the trainer reads them from
    the config object it was built with, once the data are packed."""
    r = cfg.recipe
    steps = max(1, round(r.epochs * steps_per_epoch))
    cfg.trainer.steps = min(steps, r.max_steps) if r.max_steps else steps
    cfg.schedule.warmup_steps = round(r.warmup_fraction * cfg.trainer.steps)
