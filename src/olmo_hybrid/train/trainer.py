"""The training loop: AdamW + schedule, z-loss, gradient accumulation and clipping, skipped steps,
periodic validation, checkpoints with exact resume, and the end-of-run export and sample.

One process, or N under ``torchrun`` (FSDP2 over a device mesh, see ``parallel.py``): every rank runs
this same loop on its shard of each global batch; the loss is normalised by the global number of
scored tokens, so N ranks x B sequences give the gradients of one process with N x B sequences. With
context parallelism (``parallel.cp_degree`` = n) a shard is a slice of every sequence of a data-parallel
rank's batch; the same normalisation makes N ranks give the gradients of one process with N / n x B
whole sequences.

A step does not wait for the device: scored tokens are counted on the host before the copy, a
non-finite step is skipped by the fused AdamW kernel itself (``found_inf``; on the CPU, where reading a
flag back costs nothing, by the host), and losses and gradient norms stay on the device until the next
read-back (the log interval, validation, checkpoint, end), which also checks the divergence guard.

Guard rails: the settings are checked before any work, the run directory is locked and never replaced
without ``resume`` or ``overwrite``, ``trainer.max_consecutive_skips`` skipped steps in a row stop the
run, no checkpoint or export is written with non-finite values, and an interrupted run says which
checkpoint a resume continues from.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from olmo_hybrid import checkpoint as ckpt
from olmo_hybrid.config import to_dict
from olmo_hybrid.data import TrainLoader, bits_per_byte, open_datasets, unigram_loss, val_batches
from olmo_hybrid.distributed import all_reduce, any_rank, barrier, init_distributed, rank_zero, resolve_device
from olmo_hybrid.errors import CheckpointError, ConfigError, DataError, DivergenceError
from olmo_hybrid.fsio import atomic_write_text
from olmo_hybrid.model import HybridLM
from olmo_hybrid.train.config import TrainConfig
from olmo_hybrid.train.loss import IGNORE_INDEX, ValResult, chunked_lm_loss, evaluate, loss_terms
from olmo_hybrid.train.metrics import (MetricsLogger, NullLogger, StepOutput, format_duration, peak_flops,
                                       peak_memory_gib, read_back)
from olmo_hybrid.train.optim import build_optimizer, lr_at, set_lr
from olmo_hybrid.train.parallel import data_parallel_layout, parallelize

__all__ = ["Trainer", "TrainResult", "autocast_context", "resolve_device", "seed_everything", "train"]


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
    """``Trainer(cfg, run_dir).fit()``. ``resume`` continues the run in ``run_dir`` from its newest usable
    checkpoint; ``overwrite`` starts it over (its checkpoints, export and metrics are deleted); without
    either, a directory holding a run is refused. Every check that can fail runs here, before any work."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, resume: bool = False, log=print,
                 overwrite: bool = False):
        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume, self.overwrite = resume, overwrite
        ckpt.check_run_dir(self.run_dir, resume, overwrite)
        newest = ckpt.latest_checkpoint(self.run_dir, log=lambda _: None) if resume else None
        if newest is not None:
            ckpt.check_model_config(newest.path, to_dict(cfg.model))
        t = cfg.trainer
        self.env = init_distributed(t.device)
        self.log = rank_zero(log, self.env)
        par = cfg.parallel
        self.dp_rank, self.dp_size, self.cp_rank = data_parallel_layout(self.env, par.cp_degree)
        self.device = self.env.device
        self.fsdp = self.env.distributed
        self.bf16 = bf16 = t.dtype == "bf16" or (t.dtype == "auto" and self.device.type != "cpu")
        # Under FSDP the parameters themselves are cast for compute (bf16 params, fp32 reduction);
        # a single process keeps fp32 weights and autocasts.
        self.autocast = contextlib.nullcontext if self.fsdp else autocast_context(t.dtype, self.device)
        self._t_start = time.perf_counter()
        seed_everything(t.seed)
        self._open_data()
        self._check_sample_prompt()
        torch.manual_seed(t.seed)  # weight init depends only on the seed (the same on every rank)
        # On CUDA the weights are drawn on the GPU (seconds for a 1B model; the CPU takes minutes).
        with torch.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            self.model = HybridLM(cfg.model).to(self.device)
        self.plan = parallelize(self.model, self.env, ac=t.activation_checkpointing, ac_every=t.ac_every,
                                compile=t.compile, dp_replicate=par.dp_replicate, dp_shard=par.dp_shard,
                                cp_degree=par.cp_degree, cp_mode=par.cp_mode,
                                param_dtype=torch.bfloat16 if bf16 else None,
                                reshard_after_forward=par.reshard_after_forward)
        self.plain = not (self.fsdp or t.compile or self.plan["ac_layers"])
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.forward_model = self.model
        self.peak_flops = peak_flops(self.device, t.peak_tflops)
        self.flops_per_token = cfg.model.flops_per_token(cfg.data.seq_len)
        self.step = 0
        self.tokens = 0
        self.consecutive_skips = 0

    def _check_sample_prompt(self) -> None:
        t, m = self.cfg.trainer, self.cfg.model
        if t.sample_tokens == 0:
            return
        n = len(self._sample_prompt(t.sample_prompt)[0])
        if n == 0:
            raise ConfigError(f"trainer.sample_prompt={t.sample_prompt!r} encodes to zero tokens: give a prompt, "
                              "or set trainer.sample_tokens=0")
        if m.n_attn_layers and n + t.sample_tokens > m.max_seq_len:
            raise ConfigError(f"trainer.sample_prompt ({n} tokens) + trainer.sample_tokens={t.sample_tokens} "
                              f"exceeds model.max_seq_len={m.max_seq_len}")

    # -- what the data decides (post-training overrides these) ------------------------------------
    def _open_data(self) -> None:
        """Set ``train_set``, ``val_set``, ``tokenizer``, ``data_name`` (what errors about the data name) and
        ``loader`` (``next_batch``, ``state_dict``, ``load_state_dict``): the prepared token stream and its windows."""
        cfg, par = self.cfg, self.cfg.parallel
        if cfg.data.path is None:
            self.log("data: the bundled Shakespeare corpus (tokenized and cached on first use, ~10 s)")
        if not self.env.is_main:
            barrier(self.env)  # rank 0 prepares (and caches) the data first
        self.train_set, self.val_set = open_datasets(cfg.data)
        if self.env.is_main:
            barrier(self.env)
        self.data_name = str(self.train_set.path)
        if self.val_set is None:
            raise DataError(f"{self.train_set.path} has no validation split: prepare it with val_fraction > 0")
        self.tokenizer = self.train_set.tokenizer()
        if self.train_set.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of "
                              f"{self.train_set.path} ({self.train_set.vocab_size} ids)")
        self.loader = TrainLoader.from_config(cfg.data, self.train_set, self.dp_rank, self.dp_size,
                                              cp_rank=self.cp_rank, cp_degree=par.cp_degree)

    def _describe_data(self, tokens_per_step: int) -> float | None:
        """Log what the run trains on; return the baseline the final validation loss is compared with."""
        t = self.cfg.trainer
        self.log(f"data: {self.train_set.path} ({self.train_set.n_tokens:,} train / {self.val_set.n_tokens:,} val "
                 f"tokens, {self.tokenizer.name}); {tokens_per_step:,} tokens/step x {t.steps} steps = "
                 f"{tokens_per_step * t.steps / 1e6:.2f}M tokens ({tokens_per_step * t.steps / self.train_set.n_tokens:.2f} epochs)")
        unigram = unigram_loss(self.train_set, self.val_set)
        self.log(f"unigram baseline on the validation split (same tokenizer): {unigram:.4f} nats/token")
        return unigram

    def _val_batches(self, max_batches: int | None) -> list[dict]:
        """This rank's validation batches (the first ``max_batches``; None: all). Under FSDP every forward is
        collective, so every rank returns the same number (ranks with fewer get filler that scores nothing).

        Data-parallel rank r scores windows r, r + N, ... (``val_batches``), so N ranks with B sequences each
        score the same tokens as one process with N x B (context-parallel ranks each score their slice)."""
        d = self.cfg.data
        cp = dict(cp_rank=self.cp_rank, cp_degree=self.cfg.parallel.cp_degree)
        batches = list(val_batches(self.val_set, d.seq_len, d.batch_size, d.doc_masking, self.dp_rank, self.dp_size,
                                   max_batches=max_batches, **cp))
        n_max = int(all_reduce(torch.tensor([len(batches)], device=self.device), self.env, "max").item())
        pad = n_max - len(batches)
        if pad:
            filler = next(val_batches(self.val_set, d.seq_len, 1, d.doc_masking, max_batches=1, **cp))
            batches += [dict(filler, labels=torch.full_like(filler["labels"], IGNORE_INDEX))] * pad  # scores nothing
        return batches

    def _val_record(self, val: ValResult) -> dict:
        """The metrics a validation pass adds to its step's record (``val_loss`` and ``val_bpb`` at least)."""
        return {"val_loss": val.loss, "val_bpb": bits_per_byte(val.loss, self.val_set)}

    def _sample_prompt(self, prompt: str) -> tuple[list[int], int | None]:
        """The token ids the end-of-run sample starts from, and the id that ends it (None: it runs to its length)."""
        return self.tokenizer.encode(prompt), None

    # -- pieces ------------------------------------------------------------------------------------
    def _logits(self, batch: dict, model=None, **kwargs) -> torch.Tensor:
        model = model or self.forward_model
        doc_ids = batch.get("doc_ids")  # present only with data.doc_masking
        with self.autocast():
            return model(batch["input_ids"], doc_ids=doc_ids, **kwargs)

    def _loss(self, batch: dict, norm: float | torch.Tensor, model=None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``((ce + z_loss * z) / norm, ce, z)`` for one micro-batch (ce and z summed over its tokens, detached)."""
        z_coef, chunk = self.cfg.trainer.z_loss, self.cfg.trainer.loss_chunk_tokens
        labels = batch["labels"]
        if chunk > 0:
            def head(hidden, lm_head):
                return chunked_lm_loss(hidden, lm_head.weight, labels, z_coef, 1.0 / norm, chunk,
                                       compiled=self.cfg.trainer.compile)

            return self._logits(batch, model, lm_head_fn=head)
        ce, z, _ = loss_terms(self._logits(batch, model), labels)
        return (ce + z_coef * z) / norm, ce.detach(), z.detach()

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _lock_run_dir(self) -> ckpt.RunLock | None:
        """Rank 0 takes the run directory's lock; every rank fails when it cannot."""
        lock, error = None, None
        if self.env.is_main:
            try:
                lock = ckpt.RunLock(self.run_dir, log=self.log).acquire()
            except CheckpointError as e:
                error = e
        if any_rank(error is not None, self.env):
            raise error or CheckpointError(f"rank 0 could not lock {self.run_dir}")
        return lock

    def _prepare_run_dir(self) -> None:
        """Under the lock: clear an overwritten run, restore a resumed one, write the config and tokenizer."""
        ckpt.check_run_dir(self.run_dir, self.resume, self.overwrite)  # again: another run may have finished here
        barrier(self.env)  # every rank has looked before rank 0 changes anything
        if self.overwrite and self.env.is_main:
            for name in (ckpt.CHECKPOINTS, ckpt.HF_EXPORT):
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
            (self.run_dir / ckpt.METRICS).unlink(missing_ok=True)
        barrier(self.env)  # every rank sees the directory as rank 0 left it
        if self.resume:
            found = ckpt.list_checkpoints(self.run_dir, valid_only=False)
            restored = ckpt.restore_newest(self.run_dir, model=self.model, optimizer=self.optimizer, env=self.env,
                                           log=self.log)
            if restored is not None:
                self._continue_from(*restored)
            elif found:
                raise CheckpointError(f"--resume: none of the {len(found)} checkpoints in {self.run_dir} can be "
                                      "restored (reasons above); pass --overwrite to start the run over")
            else:
                self.log(f"--resume: no checkpoint in {self.run_dir}, starting from step 0")
        if self.env.is_main:
            atomic_write_text(self.run_dir / ckpt.CONFIG, json.dumps(to_dict(self.cfg), indent=2) + "\n")
            self.tokenizer.save(self.run_dir)
        barrier(self.env)

    def _continue_from(self, info: ckpt.CheckpointInfo, state: dict) -> None:
        saved = ckpt.read_run_config(info.path)
        current = json.loads(json.dumps(to_dict(self.cfg)))  # tuples as the saved JSON lists
        other = [f"{section}.{k}" for section in ("data", "optim", "schedule", "trainer")
                 for k, v in saved.get(section, {}).items() if current[section].get(k) != v]
        # data-parallel ranks: the processes of the checkpoint's run over its context-parallel degree
        saved_dp = ckpt.read_checkpoint_world_size(info.path) // saved.get("parallel", {}).get("cp_degree", 1)
        if saved["data"]["batch_size"] * saved_dp == self.cfg.data.batch_size * self.dp_size:
            other = [k for k in other if k != "data.batch_size"]  # the same global batch on another world size
        if other:
            self.log(f"note: config differs from the checkpoint's in {', '.join(other)} "
                     f"(allowed; losses will not match an uninterrupted run)")
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.log(f"resumed from {info.path} (step {self.step}, {self.tokens:,} tokens)")

    def save(self) -> Path:
        """Write a checkpoint of the current step (collective: every rank calls it)."""
        return ckpt.save_checkpoint(self.run_dir, self.step, model=self.model, optimizer=self.optimizer,
                                    train_state={"tokens": self.tokens},
                                    rank_state={"loader": self.loader.state_dict()}, config=to_dict(self.cfg),
                                    keep_last_k=self.cfg.trainer.keep_last_k, env=self.env)

    def _steps_that_fit(self, step_s: float) -> int | None:
        """How many more steps ``trainer.max_minutes`` allows, keeping ``FINISH_RESERVE_S`` for the wrap-up
        (full validation, checkpoint, export and sample); None without a limit. Ranks agree on the fewest."""
        limit = self.cfg.trainer.max_minutes * 60
        if limit <= 0:
            return None
        left = limit - FINISH_RESERVE_S - (time.perf_counter() - self._t_start)
        fit = math.floor(left / max(step_s, 1e-9))
        return int(all_reduce(torch.tensor([fit], device=self.device), self.env, "min").item()) \
            if self.env.distributed else fit

    def validate(self, max_batches: int | None = None) -> ValResult:
        """Loss on the first ``max_batches`` validation batches of each rank (None: the whole split)."""
        batches = self._val_batches(max_batches)

        def score(batch):
            ce, _, _ = self._loss(batch, 1.0, self.model)
            return ce, (batch["labels"] != IGNORE_INDEX).sum()

        self.model.eval()
        try:
            with torch.no_grad():
                return evaluate(score, map(self._to_device, batches), reduce=lambda t: all_reduce(t, self.env))
        finally:
            self.model.train()

    def _check_ids(self, micro: list[dict]) -> None:
        """Token ids inside the model's vocabulary, checked on the host (numpy) before the copy to the device."""
        vocab = self.cfg.model.vocab_size
        for batch in micro:
            ids = batch["input_ids"].numpy()
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= vocab:
                raise DataError(f"{self.data_name}: token id {lo if lo < 0 else hi} at step {self.step + 1} is "
                                f"outside the model's vocabulary [0, {vocab}) (damaged token file?)")

    def train_step(self) -> StepOutput:
        """One optimizer step over ``grad_accum`` micro-batches, without waiting for the device; its metrics
        stay there until ``metrics.read_back``."""
        t = self.cfg.trainer
        lr = lr_at(self.step, t.steps, self.cfg.optim.lr, self.cfg.schedule)
        set_lr(self.optimizer, lr)
        ce_sum = torch.zeros((), device=self.device)
        z_sum = torch.zeros((), device=self.device)
        micro = [self.loader.next_batch() for _ in range(t.grad_accum)]
        self._check_ids(micro)
        n_tokens = sum(int((b["labels"].numpy() != IGNORE_INDEX).sum()) for b in micro)  # on the host: no sync
        step_tokens = sum(b["input_ids"].numel() for b in micro) * self.env.world_size
        micro = [self._to_device(b) for b in micro]
        if self.fsdp:  # the global count stays on the device: the division below needs no sync
            n_tokens = all_reduce(torch.tensor(n_tokens, device=self.device), self.env)
        # Normalised by the whole step's scored tokens over all ranks, so accumulation and data parallelism
        # equal one big batch (times the world size: FSDP averages the ranks' gradients).
        norm = n_tokens / self.env.world_size if self.fsdp else n_tokens
        for i, batch in enumerate(micro):
            if self.fsdp:  # reduce-scatter gradients once per step, after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
            loss, ce, z = self._loss(batch, norm)
            loss.backward()
            ce_sum += ce
            z_sum += z
        max_norm = t.clip_grad if t.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        if self.fsdp:
            sums = all_reduce(torch.stack([ce_sum, z_sum]), self.env)
            ce_sum, z_sum = sums[0], sums[1]
        mean_ce = ce_sum / n_tokens
        finite = torch.isfinite(mean_ce) & torch.isfinite(grad_norm)
        if self.optimizer.defaults.get("fused"):
            # The fused kernel leaves weights, moments and step counts untouched when found_inf is 1.
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
        elif finite:  # unfused (CPU): the flag is read on the host, which costs nothing there
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += step_tokens
        return StepOutput(self.step, lr, self.tokens, mean_ce.detach(), (z_sum / n_tokens).detach(), grad_norm.detach())

    # -- the run -------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to ``trainer.steps`` (or the time budget), validate, save, export and sample, holding the
        run directory's lock. Ctrl-C raises ``KeyboardInterrupt`` saying where a resume would continue."""
        lock = self._lock_run_dir()
        try:
            return self._fit()
        except KeyboardInterrupt as e:
            raise KeyboardInterrupt(self._interrupted_note()) from e
        finally:
            if lock is not None:
                lock.release()

    def _interrupted_note(self) -> str:
        info = ckpt.latest_checkpoint(self.run_dir, log=lambda _: None)
        if info is None:
            return f"interrupted at step {self.step}: no checkpoint was written yet, so --resume starts from step 0"
        return f"interrupted at step {self.step}: --resume continues from {info.path} (step {info.step})"

    def _fit(self) -> TrainResult:
        t, d = self.cfg.trainer, self.cfg.data
        self._prepare_run_dir()
        n_params = sum(p.numel() for p in self.model.parameters())
        tokens_per_step = t.grad_accum * d.batch_size * d.seq_len * self.dp_size
        if self.fsdp:
            dtype = "bf16 params, fp32 reduction" if self.bf16 else "fp32"
        else:
            dtype = "bf16 autocast" if self.autocast is not contextlib.nullcontext else "fp32"
        self.log(f"model: {n_params / 1e6:.2f}M parameters ({self.model.num_params(embeddings=False) / 1e6:.2f}M "
                 f"without the embedding), layers {''.join(self.cfg.model.layer_types)}, {self.device}, {dtype}")
        self._log_plan()
        unigram = self._describe_data(tokens_per_step)
        logger = MetricsLogger(self.run_dir, t.steps, t.log_interval, resume_step=self.step,
                               tensorboard=t.tensorboard, wandb_project=t.wandb_project or None,
                               config=to_dict(self.cfg), log=self.log) if self.env.is_main else NullLogger()
        result = TrainResult(self.run_dir, self.step, None, None, unigram)
        self.model.train()
        try:
            self._train_loop(logger, result, tokens_per_step)
        finally:
            logger.close()
        result.steps = self.step
        if result.final_val_loss is None:  # --resume of a run that had already finished
            final = self._val_record(self.validate())
            result.final_val_loss, result.final_val_bpb = final["val_loss"], final["val_bpb"]
        if t.export_hf or t.sample_tokens > 0:
            plain = self.plain_model()  # collective under FSDP; None on ranks other than 0
            if plain is not None and t.export_hf:
                result.hf_dir = ckpt.export_hf(self.run_dir, plain, self.tokenizer)
            if plain is not None and t.sample_tokens > 0:
                result.sample = self.sample(t.sample_prompt, t.sample_tokens, t.sample_temperature, plain)
            barrier(self.env)
        result.wall_s = time.perf_counter() - self._t_start
        self._summary(result)
        return result

    def _train_loop(self, logger, result: TrainResult, tokens_per_step: int) -> None:
        """Steps until ``trainer.steps`` or the time budget. The device's metrics are read back (one sync) at
        the first step, each log interval, validation, checkpoint, time-budget check and the end."""
        t = self.cfg.trainer
        pending: list[StepOutput] = []
        first, check_time_at = self.step + 1, None
        train_s, run_steps = 0.0, 0
        window_start = time.perf_counter()
        while self.step < t.steps:
            pending.append(self.train_step())
            step = self.step
            last = step == t.steps
            evaluate = t.eval_interval > 0 and step % t.eval_interval == 0
            save = t.save_interval > 0 and step % t.save_interval == 0
            if not (last or evaluate or save or step == first or step % t.log_interval == 0 or step == check_time_at):
                continue
            records = read_back(pending)  # waits for the device, so the window's wall time is its compute time
            window_s = time.perf_counter() - window_start
            train_s, run_steps, pending = train_s + window_s, run_steps + len(records), []
            for r in records:
                r.update(self._throughput(tokens_per_step, window_s / len(records)))
            fit = None if last else self._steps_that_fit(train_s / run_steps)
            if fit is not None and fit <= 0:
                last = result.stopped_early = True
                logger.print(f"trainer.max_minutes={t.max_minutes:g} reached: stopping at step {step} of "
                             f"{t.steps} (the learning-rate schedule did not finish; this machine is slower "
                             f"than the preset assumes)")
            check_time_at = step + fit if fit else None
            if last or evaluate:
                # Periodic passes may use a prefix of the split; the final one scores all of it,
                # on the same tokens as the unigram baseline.
                val = self.validate(None if last or t.eval_batches == 0 else t.eval_batches)
                records[-1].update(self._val_record(val))
                if last:
                    result.final_val_loss, result.final_val_bpb = records[-1]["val_loss"], records[-1]["val_bpb"]
            for r in records:
                logger.log(r)
                result.losses.append(r["loss"])
            self._check_divergence(records)
            if last or save:
                self.save()
            if last:
                break
            window_start = time.perf_counter()  # validation and saving are not training time

    def _check_divergence(self, records: list[dict]) -> None:
        """Stop the run after ``trainer.max_consecutive_skips`` skipped steps in a row: the weights or the
        optimizer state have gone non-finite, or every batch now overflows; no further checkpoint is written."""
        limit = self.cfg.trainer.max_consecutive_skips
        for r in records:
            self.consecutive_skips = self.consecutive_skips + 1 if "skipped" in r else 0
            if self.consecutive_skips >= limit:
                info = ckpt.latest_checkpoint(self.run_dir, log=lambda _: None)
                kept = (f"the newest checkpoint {info.path} (step {info.step}) is finite: lower optim.lr or check "
                        "the data, then --resume" if info else "no checkpoint was written")
                raise DivergenceError(f"training diverged: {limit} steps in a row were skipped, the last at step "
                                      f"{r['step']} ({r['skipped']}); stopping (trainer.max_consecutive_skips="
                                      f"{limit}); {kept}")

    def _throughput(self, tokens_per_step: int, dt: float) -> dict:
        """tokens/s (all ranks and per device), MFU against the device's peak, and peak memory."""
        per_device = tokens_per_step / self.env.world_size / max(dt, 1e-9)
        out = {"tokens_per_s": tokens_per_step / max(dt, 1e-9), "tokens_per_s_per_device": per_device}
        if self.env.distributed:
            out["world_size"] = self.env.world_size
        if self.peak_flops:
            out["mfu"] = per_device * self.flops_per_token / self.peak_flops
        mem = peak_memory_gib(self.device)
        if mem is not None:
            out["peak_mem_gib"] = mem
        return out

    def _log_plan(self) -> None:
        t, plan = self.cfg.trainer, self.plan
        if self.env.distributed:
            mesh, par = plan["mesh"], self.cfg.parallel
            cp = (f", context parallel {par.cp_degree} ({par.cp_mode}: each sequence split in {par.cp_degree} "
                  f"slices of {self.cfg.data.seq_len // par.cp_degree} tokens)" if plan["cp"] is not None else "")
            self.log(f"parallel: {self.env.world_size} processes, FSDP2 over mesh "
                     f"{dict(zip(mesh.mesh_dim_names, mesh.shape))}{cp} (torchrun; rank 0 logs)")
        if plan["ac_layers"]:
            self.log(f"activation checkpointing ({t.activation_checkpointing}): blocks {plan['ac_layers']}")
        if t.compile:
            self.log("torch.compile: every block (fullgraph)")
        if t.loss_chunk_tokens:
            self.log(f"loss: chunked cross-entropy, {t.loss_chunk_tokens} tokens per chunk")
        if self.peak_flops is None and self.device.type == "cuda":
            self.log(f"note: no peak FLOP/s known for {torch.cuda.get_device_name(self.device)}; set "
                     "trainer.peak_tflops to log MFU")

    def plain_model(self) -> HybridLM | None:
        """The trained weights in an unwrapped ``HybridLM`` (for export and sampling): the model itself when
        nothing wraps it, else a copy gathered from the shards onto rank 0 (None on other ranks)."""
        if self.plain:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.env.is_main:
            return None
        plain = HybridLM(self.cfg.model, init=False)
        plain.load_state_dict(full)
        return plain.to(self.device)

    @torch.no_grad()
    def sample(self, prompt: str, max_new_tokens: int, temperature: float, model: HybridLM | None = None) -> str:
        model = model or self.model
        model.eval()
        prompt_ids, end_id = self._sample_prompt(prompt)
        ids = torch.tensor([prompt_ids], device=self.device)
        # The engine's seeded sampler: `olmo-hybrid generate RUN --seed S --top-p 1.0 ...` gives the same tokens.
        out = model.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=self.cfg.trainer.sample_top_k, seed=self.cfg.trainer.seed, eos_token_id=end_id)
        return self.tokenizer.decode(out[0].tolist())

    def _summary(self, r: TrainResult) -> None:
        self.log("")
        self.log(f"finished {r.steps} steps in {format_duration(r.wall_s)} (data preparation included); "
                 f"run directory {self.run_dir}")
        if r.losses:
            self.log(f"training loss {r.losses[0]:.4f} at the first step of this run -> {r.losses[-1]:.4f} at the last")
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


def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, log=print,
          overwrite: bool = False) -> TrainResult:
    return Trainer(cfg, run_dir, resume=resume, log=log, overwrite=overwrite).fit()
