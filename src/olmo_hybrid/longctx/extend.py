"""The ``extend`` stage: continue a trained model at a longer context in a new run directory.

    extend(SOURCE, OUT, method="drope", seq_len=4096, steps=200)     # or tokens=...; overrides=["optim.lr=2e-4"]

SOURCE is a run directory or a Hugging Face checkpoint. The new run is an ordinary training run (the trainer,
its checkpoints, exact resume, export), configured as OLMo Hybrid's long-context stage: the source's recipe
(data, optimizer, dtype, seed) when SOURCE is a run; positions changed by ``method`` (``methods.py``); sequences of
``train_len`` tokens (default ``seq_len``) packed from the documents, with intra-document masking off unless
``data.doc_masking=true``; the same tokens per step as the source (fewer, longer sequences); a warmup then a linear
decay to 0 over the stage; activation checkpointing and the chunked loss through the trainer's settings. Any
``section.field=value`` override of the training config is applied last (``parallel.cp_degree`` and
``parallel.cp_mode`` for context parallelism under torchrun, ...). The model config in ``OUT/config.json``
records the positions, so every later load (generate, eval, serve, export) rebuilds them; ``OUT/extend.json``
records the stage itself once it finishes.

The source's weights are loaded only when the stage starts from step 0; a resumed stage continues from its own
newest checkpoint. A configuration estimated not to fit the device is refused before any work (``memory.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from olmo_hybrid import checkpoint as ckpt
from olmo_hybrid.config import apply_overrides, coerce_field, from_dict, to_dict
from olmo_hybrid.data import TokenDataset
from olmo_hybrid.distributed import dist_env_world_size, resolve_device
from olmo_hybrid.errors import CheckpointError, ConfigError, DataError
from olmo_hybrid.fsio import atomic_write_text
from olmo_hybrid.longctx.memory import check_fits
from olmo_hybrid.longctx.methods import describe_positions, extended_config, original_length
from olmo_hybrid.train.config import TrainConfig, TrainerConfig
from olmo_hybrid.train.trainer import Trainer, TrainResult

EXTEND_RECORD = "extend.json"
HF_SOURCE_TOKENS_PER_STEP = 65_536  # tokens per step when the source is a HF checkpoint with no recipe
MAX_WARMUP = 200  # OLMo Hybrid's long-context warmup (of 23,842 steps)
# What --method, --seq-len and --original-len decide (with whether there is RoPE at all): an override of one would
# contradict them. rope_theta (a base-frequency change) and the shape of a YaRN ramp (betas, mscale, truncate, the
# attention factor) may be overridden.
POSITION_FIELDS = ("rope_type", "rope_factor", "rope_original_max_seq_len")


@dataclasses.dataclass
class ExtendPlan:
    source: Path
    method: str
    seq_len: int  # the extended model's window
    train_len: int  # the length this stage trains at (seq_len, or the original length to recalibrate)
    original_len: int  # the length the source's positions were trained at
    config: TrainConfig

    def record(self) -> dict:
        d = self.config.data
        tokens_per_step = d.batch_size * d.seq_len * self.config.trainer.grad_accum
        return {"source": str(self.source), "method": self.method, "seq_len": self.seq_len,
                "train_len": self.train_len, "original_len": self.original_len,
                "positions": describe_positions(self.config.model), "steps": self.config.trainer.steps,
                "tokens_per_step": tokens_per_step, "tokens": tokens_per_step * self.config.trainer.steps}


def _source_recipe(source: Path) -> tuple[TrainConfig | None, int | None]:
    """(the source run's training config, the length it trained at); (None, None) for a HF checkpoint."""
    if ckpt.is_hf_dir(source) or not ckpt.is_run_dir(source):
        return None, None
    cfg = from_dict(TrainConfig, ckpt.read_run_config(source))
    return cfg, cfg.data.seq_len


def plan_extension(source: str | Path, method: str, seq_len: int, *, steps: int | None = None,
                   tokens: int | None = None, train_len: int | None = None, recalibrate: bool = False,
                   original_len: int | None = None, overrides: list[str] = ()) -> ExtendPlan:
    """The long-context stage's training config (not yet run); see the module docstring for the defaults."""
    for flag, length in (("--seq-len", seq_len), ("--train-len", train_len), ("--original-len", original_len)):
        if length is not None and length < 1:
            raise ConfigError(f"{flag} must be a positive number of tokens, got {length}")
    source = Path(source)
    model = ckpt.read_model_config(source)
    recipe, trained_len = _source_recipe(source)
    original = original_len if original_len is not None else original_length(model, trained_len, method)
    positions = extended_config(model, method, seq_len, original)
    if recalibrate:
        if method != "drope":
            raise ConfigError("--recalibrate is DroPE's recipe (train briefly at the original length after dropping "
                              "RoPE): it needs --method drope")
        if train_len is not None and train_len != original:
            raise ConfigError(f"--recalibrate trains at the original length {original}, not --train-len {train_len}")
        train_len = original
    train_len = train_len if train_len is not None else seq_len
    if train_len > seq_len:
        given = f"the original length {train_len} (--recalibrate)" if recalibrate else f"--train-len {train_len}"
        raise ConfigError(f"{given} exceeds --seq-len {seq_len}: the model would train past its window")
    base = recipe or TrainConfig(model=model)
    tokens_per_step = (base.data.batch_size * base.data.seq_len if recipe else HF_SOURCE_TOKENS_PER_STEP)
    batch = max(1, tokens_per_step // train_len)
    n_steps = _steps(steps, tokens, batch * train_len * base.trainer.grad_accum, overrides)
    stage = {
        "model": to_dict(positions),
        "data": {"seq_len": train_len, "batch_size": batch},
        "schedule": {"name": "linear", "final_lr_fraction": 0.0, "warmup_steps": min(MAX_WARMUP, max(1, n_steps // 20))},
        "trainer": {"steps": n_steps, "save_interval": max(1, n_steps // 10), "eval_interval": max(1, n_steps // 4),
                    "max_minutes": 0.0, "export_hf": True},
    }
    merged = to_dict(base)
    for section, values in stage.items():
        merged[section] = {**merged[section], **values}
    cfg = apply_overrides(from_dict(TrainConfig, merged), list(overrides))
    if cfg.model.max_seq_len != seq_len or cfg.data.seq_len != train_len:
        raise ConfigError("set the lengths with --seq-len and --train-len, not model.max_seq_len / data.seq_len")
    changed = [f for f in POSITION_FIELDS if getattr(cfg.model, f) != getattr(positions, f)]
    if (cfg.model.rope_theta is None) != (positions.rope_theta is None):
        changed.insert(0, "rope_theta")
    if changed:
        f = changed[0]
        raise ConfigError(f"model.{f}={getattr(cfg.model, f)} contradicts --method {method} (which gives "
                          f"{getattr(positions, f)} for --seq-len {seq_len:,} from the original length {original:,}): "
                          "set the positions with --method, --seq-len and --original-len")
    return ExtendPlan(source, method, seq_len, train_len, original, cfg)


def _steps(steps: int | None, tokens: int | None, tokens_per_step: int, overrides) -> int:
    given = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].strip() == "trainer.steps"]
    if sum(x is not None for x in (steps, tokens)) + bool(given) != 1:
        raise ConfigError("give the stage's length once: --steps N, --tokens N (a token budget) or trainer.steps=N")
    if tokens is not None:
        if tokens < 1:
            raise ConfigError(f"--tokens must be positive, got {tokens}")
        return math.ceil(tokens / tokens_per_step)
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be positive, got {steps}")
        return steps
    return coerce_field(TrainerConfig, "steps", given[-1], "trainer.steps")


def _check_paths(source: Path, out: Path) -> None:
    if not source.exists():
        raise CheckpointError(f"source {source} does not exist (expected a run directory or a HF checkpoint)")
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise ConfigError(f"--out {out} is the source or inside it: extend writes a new run directory elsewhere")


def _check_tokenizer(source_tokenizer, cfg: TrainConfig, source: Path) -> None:
    """The training data must be tokenized as the source was (same ids)."""
    if source_tokenizer is None:
        return
    data = TokenDataset(cfg.data.resolve_path(), "train")
    if data.tokenizer().fingerprint != source_tokenizer.fingerprint:
        raise DataError(f"{data.path} was tokenized with {data.tokenizer().name}, but {source} uses "
                        f"{source_tokenizer.name}: prepare the data with the source's tokenizer "
                        f"(olmo-hybrid prepare ... --tokenizer {source}) and pass data.path=DIR")


def load_source_weights(trainer: Trainer, source_model) -> None:
    """Copy the source's weights into the trainer's model (plain, checkpoint-wrapped or FSDP-sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(trainer.model, source_model.state_dict(), options=StateDictOptions(full_state_dict=True))


def extend(source: str | Path, out: str | Path, method: str, seq_len: int, *, steps: int | None = None,
           tokens: int | None = None, train_len: int | None = None, recalibrate: bool = False,
           original_len: int | None = None, overrides: list[str] = (), resume: bool = False, overwrite: bool = False,
           check_memory: bool = True, log=print) -> TrainResult:
    """Run the long-context stage from ``source`` into the new run directory ``out`` (see the module docstring)."""
    source, out = Path(source), Path(out)
    _check_paths(source, out)
    plan = plan_extension(source, method, seq_len, steps=steps, tokens=tokens, train_len=train_len,
                          recalibrate=recalibrate, original_len=original_len, overrides=overrides)
    cfg = plan.config
    device = resolve_device(cfg.trainer.device, int(os.environ.get("LOCAL_RANK", "0")))
    estimate = check_fits(cfg, device, dist_env_world_size()) if check_memory else None
    resuming = resume and ckpt.latest_checkpoint(out, log=lambda _: None) is not None
    source_model, source_tokenizer = (None, None) if resuming else \
        ckpt.load_model_and_tokenizer(source, require_tokenizer=False, log=log)
    if not resuming:
        _check_tokenizer(source_tokenizer, cfg, source)
    log(f"extend {source} -> {out}: --method {method}, window {seq_len:,} tokens, training at {plan.train_len:,} "
        f"(source positions trained at {plan.original_len:,}); positions: {describe_positions(cfg.model)}")
    if estimate is not None:
        log(f"memory estimate on {device}: {estimate.describe()}")
    trainer = Trainer(cfg, out, resume=resume, overwrite=overwrite, log=log)
    if source_model is not None:
        load_source_weights(trainer, source_model)
        del source_model
    result = trainer.fit()
    if trainer.env.is_main:
        atomic_write_text(out / EXTEND_RECORD, json.dumps(plan.record(), indent=2) + "\n")
    return result


def read_extend_record(run_dir: str | Path) -> dict | None:
    """``extend.json`` of a finished extend stage, or None."""
    f = Path(run_dir) / EXTEND_RECORD
    return json.loads(f.read_text()) if f.is_file() else None


