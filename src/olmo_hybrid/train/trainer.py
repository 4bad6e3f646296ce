"""The training loop: AdamW + schedule, z-loss, gradient accumulation and clipping, skipped steps,
periodic validation, checkpoints with exact resume, and the end-of-run export and sample."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from olmo_hybrid.config import ConfigError, to_dict
from olmo_hybrid.data import DataError, TrainLoader, bits_per_byte, open_datasets, unigram_loss, val_batches
from olmo_hybrid.fsio import atomic_write_text
from olmo_hybrid.model import HybridLM
from olmo_hybrid.train import checkpoint as ckpt
from olmo_hybrid.train.config import TrainConfig
from olmo_hybrid.train.loss import ValResult, evaluate, loss_terms
from olmo_hybrid.train.metrics import MetricsLogger, format_duration
from olmo_hybrid.train.optim import build_optimizer, lr_at, set_lr


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_val_loss: float | None
    final_val_bpb: float | None
    unigram_val_loss: float | None
    losses: list[float] = field(default_factory=list)  # per-step training loss of this invocation
    sample: str | None = None
    hf_dir: Path | None = None
    wall_s: float = 0.0
    stopped_early: bool = False  # trainer.max_minutes ran out before trainer.steps


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"trainer.device: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r} but CUDA is not available (use 'auto' or 'cpu')")
    return device


def autocast_context(dtype: str, device: torch.device):
    """bf16 autocast on accelerators by default, plain fp32 on CPU (``trainer.dtype=auto``)."""
    if dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"trainer.dtype: expected auto, fp32 or bf16, got {dtype!r}")
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type != "cpu")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Seconds kept back from trainer.max_minutes for what follows the last step (measured for the tiny
# preset on 2 cores: full validation ~6 s, checkpoint + export < 1 s, a 120-token sample ~2 s).
FINISH_RESERVE_S = 30.0


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, resume: bool = False, log=print):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.log = log
        t = cfg.trainer
        self.device = resolve_device(t.device)
        self.autocast = autocast_context(t.dtype, self.device)
        self._t_start = time.perf_counter()
        seed_everything(t.seed)
        if cfg.data.path is None:
            log("data: the bundled Shakespeare corpus (tokenized and cached on first use, ~10 s)")
        self.train_set, self.val_set = open_datasets(cfg.data)
        if self.val_set is None:
            raise DataError(f"{self.train_set.path} has no validation split: prepare it with val_fraction > 0")
        self.tokenizer = self.train_set.tokenizer()
        if self.train_set.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of "
                              f"{self.train_set.path} ({self.train_set.vocab_size} ids)")
        self.loader = TrainLoader.from_config(cfg.data, self.train_set)
        torch.manual_seed(t.seed)  # weight init depends only on the seed, not on data preparation
        self.model = HybridLM(cfg.model).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.forward_model = torch.compile(self.model) if t.compile else self.model
        self.step = 0
        self.tokens = 0

    # -- pieces ------------------------------------------------------------------------------------
    def _logits(self, batch: dict, model=None) -> torch.Tensor:
        model = model or self.forward_model
        doc_ids = batch.get("doc_ids")  # present only with data.doc_masking
        with self.autocast():
            return model(batch["input_ids"], doc_ids=doc_ids)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _prepare_run_dir(self) -> None:
        existing = ckpt.list_checkpoints(self.run_dir, valid_only=False)
        if existing and not self.resume:
            raise ckpt.CheckpointError(
                f"{self.run_dir} already holds checkpoints (newest {existing[-1].path.name}); pass --resume to "
                f"continue that run, or choose another --out directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            info = ckpt.latest_checkpoint(self.run_dir, log=self.log)
            if info is None:
                self.log(f"--resume: no valid checkpoint in {self.run_dir}, starting from step 0")
            else:
                self._load(info)
        atomic_write_text(self.run_dir / "config.json", json.dumps(to_dict(self.cfg), indent=2) + "\n")
        self.tokenizer.save(self.run_dir)

    def _load(self, info: ckpt.CheckpointInfo) -> None:
        ckpt.check_model_config(info.path, to_dict(self.cfg.model))
        saved = ckpt.read_checkpoint_config(info.path)
        other = [f"{section}.{k}" for section in ("data", "optim", "schedule", "trainer")
                 for k, v in saved.get(section, {}).items()
                 if to_dict(getattr(self.cfg, section)).get(k) != v]
        if other:
            self.log(f"note: config differs from the checkpoint's in {', '.join(other)} "
                     f"(allowed; losses will not match an uninterrupted run)")
        state = ckpt.load_checkpoint(info.path, model=self.model, optimizer=self.optimizer,
                                     map_location=self.device)
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.log(f"resumed from {info.path} (step {self.step}, {self.tokens:,} tokens)")

    def save(self) -> Path:
        state = {"tokens": self.tokens, "loader": self.loader.state_dict()}
        return ckpt.save_checkpoint(self.run_dir, self.step, model=self.model, optimizer=self.optimizer,
                                    train_state=state, config=to_dict(self.cfg),
                                    keep_last_k=self.cfg.trainer.keep_last_k)

    def _out_of_time(self, step_s: float) -> bool:
        """True when another step would leave too little of ``trainer.max_minutes`` for the wrap-up
        (full validation, checkpoint, export and sample, budgeted at ``FINISH_RESERVE_S``)."""
        limit = self.cfg.trainer.max_minutes * 60
        if limit <= 0:
            return False
        return time.perf_counter() - self._t_start + step_s > limit - FINISH_RESERVE_S

    def validate(self, max_batches: int | None = None) -> ValResult:
        """Loss on the first ``max_batches`` validation batches (None: the whole split)."""
        d = self.cfg.data
        batches = val_batches(self.val_set, d.seq_len, d.batch_size, d.doc_masking, max_batches=max_batches)
        self.model.eval()
        try:
            return evaluate(lambda b: self._logits(b, self.model), map(self._to_device, batches))
        finally:
            self.model.train()

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's metrics."""
        t = self.cfg.trainer
        lr = lr_at(self.step, t.steps, self.cfg.optim.lr, self.cfg.schedule)
        set_lr(self.optimizer, lr)
        ce_sum = torch.zeros((), device=self.device)
        z_sum = torch.zeros((), device=self.device)
        micro = [self._to_device(self.loader.next_batch()) for _ in range(t.grad_accum)]
        n_tokens = sum(int((b["labels"] != -100).sum()) for b in micro)
        for batch in micro:
            ce, z, _ = loss_terms(self._logits(batch), batch["labels"])
            # Normalised by the whole step's scored tokens, so accumulation equals one big batch.
            ((ce + t.z_loss * z) / n_tokens).backward()
            ce_sum += ce.detach()
            z_sum += z.detach()
        max_norm = t.clip_grad if t.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        loss = (ce_sum / n_tokens).item()
        skipped = None
        if not math.isfinite(loss):
            skipped = f"non-finite loss ({loss})"
        elif not math.isfinite(grad_norm):
            skipped = f"non-finite gradient norm ({grad_norm})"
        if skipped is None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += sum(b["input_ids"].numel() for b in micro)
        record = {"step": self.step, "loss": loss, "z_loss": (z_sum / n_tokens).item(), "lr": lr,
                  "grad_norm": grad_norm, "tokens": self.tokens}
        if skipped:
            record["skipped"] = skipped
        return record

    # -- the run -------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        t, d = self.cfg.trainer, self.cfg.data
        self._prepare_run_dir()
        n_params = sum(p.numel() for p in self.model.parameters())
        tokens_per_step = t.grad_accum * d.batch_size * d.seq_len
        dtype = "bf16 autocast" if self.autocast is not contextlib.nullcontext else "fp32"
        self.log(f"model: {n_params / 1e6:.2f}M parameters ({self.model.num_params(embeddings=False) / 1e6:.2f}M "
                 f"without the embedding), layers {''.join(self.cfg.model.layer_types)}, {self.device}, {dtype}")
        self.log(f"data: {self.train_set.path} ({self.train_set.n_tokens:,} train / {self.val_set.n_tokens:,} val "
                 f"tokens, {self.tokenizer.name}); {tokens_per_step:,} tokens/step x {t.steps} steps = "
                 f"{tokens_per_step * t.steps / 1e6:.2f}M tokens ({tokens_per_step * t.steps / self.train_set.n_tokens:.2f} epochs)")
        unigram = unigram_loss(self.train_set, self.val_set)
        self.log(f"unigram baseline on the validation split (same tokenizer): {unigram:.4f} nats/token")
        logger = MetricsLogger(self.run_dir, t.steps, t.log_interval, resume_step=self.step,
                               tensorboard=t.tensorboard, wandb_project=t.wandb_project or None,
                               config=to_dict(self.cfg))
        result = TrainResult(self.run_dir, self.step, None, None, unigram)
        first_loss = None
        self.model.train()
        try:
            train_s, run_steps = 0.0, 0
            while self.step < t.steps:
                t0 = time.perf_counter()
                record = self.train_step()
                dt = time.perf_counter() - t0
                train_s, run_steps = train_s + dt, run_steps + 1
                record["tokens_per_s"] = tokens_per_step / max(dt, 1e-9)
                out_of_time = self.step < t.steps and self._out_of_time(train_s / run_steps)
                last = self.step == t.steps or out_of_time
                if out_of_time:
                    result.stopped_early = True
                    logger.print(f"trainer.max_minutes={t.max_minutes:g} reached: stopping at step {self.step} of "
                                 f"{t.steps} (the learning-rate schedule did not finish; this machine is slower "
                                 f"than the preset assumes)")
                if last or (t.eval_interval > 0 and self.step % t.eval_interval == 0):
                    # Periodic passes may use a prefix of the split; the final one scores all of it,
                    # on the same tokens as the unigram baseline.
                    val = self.validate(None if last or t.eval_batches == 0 else t.eval_batches)
                    record.update(val_loss=val.loss, val_bpb=bits_per_byte(val.loss, self.val_set))
                    if last:
                        result.final_val_loss, result.final_val_bpb = record["val_loss"], record["val_bpb"]
                logger.log(record)
                result.losses.append(record["loss"])
                first_loss = record["loss"] if first_loss is None else first_loss
                if last or (t.save_interval > 0 and self.step % t.save_interval == 0):
                    self.save()
                if out_of_time:
                    break
        finally:
            logger.close()
        result.steps = self.step
        if result.final_val_loss is None:  # --resume of a run that had already finished
            val = self.validate()
            result.final_val_loss, result.final_val_bpb = val.loss, bits_per_byte(val.loss, self.val_set)
        if t.export_hf:
            result.hf_dir = ckpt.export_hf(self.run_dir, self.model, self.tokenizer)
        if t.sample_tokens > 0:
            result.sample = self.sample(t.sample_prompt, t.sample_tokens, t.sample_temperature)
        result.wall_s = time.perf_counter() - self._t_start
        self._summary(result, first_loss)
        return result

    @torch.no_grad()
    def sample(self, prompt: str, max_new_tokens: int, temperature: float) -> str:
        self.model.eval()
        ids = torch.tensor([self.tokenizer.encode(prompt)], device=self.device)
        torch.manual_seed(self.cfg.trainer.seed)
        out = self.model.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=self.cfg.trainer.sample_top_k)
        return self.tokenizer.decode(out[0].tolist())

    def _summary(self, r: TrainResult, first_loss: float | None) -> None:
        self.log("")
        self.log(f"finished {r.steps} steps in {format_duration(r.wall_s)} (data preparation included); "
                 f"run directory {self.run_dir}")
        if first_loss is not None and r.losses:
            self.log(f"training loss {first_loss:.4f} at the first step of this run -> {r.losses[-1]:.4f} at the last")
        if r.final_val_loss is not None and r.unigram_val_loss is not None:
            gap = r.unigram_val_loss - r.final_val_loss
            self.log(f"validation loss {r.final_val_loss:.4f} nats/token ({r.final_val_bpb:.3f} bits/byte) vs the "
                     f"unigram baseline {r.unigram_val_loss:.4f}: {abs(gap):.4f} {'below' if gap > 0 else 'ABOVE'} it")
        if r.hf_dir is not None:
            self.log(f"Hugging Face export: {r.hf_dir}")
        if r.sample is not None:
            how = "greedy" if self.cfg.trainer.sample_temperature == 0 else \
                f"temperature {self.cfg.trainer.sample_temperature}"
            self.log(f"sample ({how}, top_k {self.cfg.trainer.sample_top_k}, seed {self.cfg.trainer.seed}):")
            self.log("-" * 72)
            self.log(r.sample)
            self.log("-" * 72)


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, log=print) -> TrainResult:
    return Trainer(cfg, run_dir, resume=resume, log=log).fit()
