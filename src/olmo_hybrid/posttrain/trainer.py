"""Post-training on the project's trainer: the same loop, checkpoints, exact resume, FSDP2 and progress,
with conversations (or pairs) packed into rows instead of a token stream, and weights from a source checkpoint.

``PostTrainer`` overrides the trainer's data hooks (``_open_data``, ``_describe_data``, ``_val_record``),
``validate`` and ``sample``; ``SFTTrainer`` trains the masked cross-entropy of assistant tokens with the
trainer's own loss (labels are -100 elsewhere, so the loss is the mean over the step's assistant tokens).
``DPOTrainer`` (``dpo.py``) replaces the loss.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from olmo_hybrid.config import ConfigError
from olmo_hybrid.posttrain.chat import ChatTemplate
from olmo_hybrid.posttrain.config import set_steps
from olmo_hybrid.posttrain.examples import Report, Sequence, read_records, tokenize_conversations
from olmo_hybrid.posttrain.packing import IGNORE_INDEX, RowLoader, pack_conversations, split_for_rank
from olmo_hybrid.posttrain.source import Source
from olmo_hybrid.train.distributed import all_reduce
from olmo_hybrid.train.loss import ValResult, evaluate
from olmo_hybrid.train.trainer import Trainer


class PostTrainer(Trainer):
    """A trainer whose model starts from ``source`` and whose data are examples read from ``cfg.data``."""

    what = "examples"

    def __init__(self, cfg, run_dir: str | Path, source: Source, resume: bool = False, log=print):
        self.source = source
        super().__init__(cfg, run_dir, resume=resume, log=log)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # A full (unsharded) state dict, loaded into whatever wraps the model (FSDP shards it).
        set_model_state_dict(self.model, source.state_dict, options=StateDictOptions(full_state_dict=True))

    # -- data ----------------------------------------------------------------------------------------
    def _split_records(self) -> tuple[list, list]:
        d = self.cfg.data
        records = list(read_records(d.path, d.split))
        if d.val_path:
            return records, list(read_records(d.val_path, d.split))
        if d.val_fraction == 0:
            raise ConfigError("post-training validates on held-out examples: set data.val_fraction > 0 or data.val_path")
        n_val = max(1, round(d.val_fraction * len(records)))
        if len(records) < n_val + 1:
            raise ConfigError(f"{d.path} has {len(records)} examples: too few to hold out {n_val} for validation")
        held = set(np.random.default_rng(d.seed).permutation(len(records))[:n_val].tolist())
        return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])

    def _rows(self, records: list, train: bool) -> tuple[dict[str, np.ndarray], Report, list[Sequence]]:
        """Rows of ``records``, the tokenization report and the sequences in them."""
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)

    def _open_data(self) -> None:
        d = self.cfg.data
        self.tokenizer = self.source.tokenizer
        self.chat = ChatTemplate(self.tokenizer)
        train, val = self._split_records()
        self.train_rows, self.train_report, seqs = self._rows(train, train=True)
        self.train_tokens = sum(len(s.ids) for s in seqs)
        self.val_rows, self.val_report, seqs = self._rows(val, train=False)
        scored = int((self.val_rows["labels"] != IGNORE_INDEX).sum())
        self.val_bytes_per_token = sum(s.n_bytes for s in seqs) / max(1, scored)
        self.loader = RowLoader(self.train_rows, d.batch_size, d.seed, self.env.rank, self.env.world_size)
        set_steps(self.cfg, self.loader.steps_per_epoch)
        self.train_set = self.val_set = None

    def _describe_data(self, tokens_per_step: int) -> None:
        d, t = self.cfg.data, self.cfg.trainer
        rows = self.train_rows
        filled = self.train_tokens / rows["input_ids"].size
        trained = int((rows["labels"] != IGNORE_INDEX).sum())
        self.log(f"data: {d.path}: {self.train_report.describe(self.what, d.seq_len)}")
        self.log(f"      {len(rows['input_ids']):,} rows of {d.seq_len} tokens ({filled:.0%} filled), {trained:,} "
                 f"trained tokens; validation: {self.val_report.describe(self.what, d.seq_len)}")
        self.log(f"      {tokens_per_step:,} tokens/step x {t.steps} steps ({self.loader.steps_per_epoch} steps per "
                 f"epoch; chat template of {self.tokenizer.name})")
        return None  # no unigram baseline for responses

    # -- validation and sampling -------------------------------------------------------------------
    def _val_batches(self, max_batches: int | None) -> list[dict]:
        batches = split_for_rank(self.val_rows, self.cfg.data.batch_size, self.env.rank, self.env.world_size)
        return batches[:max_batches] if max_batches else batches

    def _val_record(self, val: ValResult) -> dict:
        return {"val_loss": val.loss, "val_bpb": val.loss / math.log(2) / self.val_bytes_per_token}

    @torch.no_grad()
    def sample(self, prompt: str, max_new_tokens: int, temperature: float, model=None) -> str:
        """``prompt`` sent as one user turn; the rendered prompt and the reply, which ends at ``<|im_end|>``."""
        model = model or self.model
        model.eval()
        ids = torch.tensor([self.chat.prompt_ids(prompt)], device=self.device)
        torch.manual_seed(self.cfg.trainer.seed)
        out = model.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=self.cfg.trainer.sample_top_k, eos_token_id=self.chat.end_of_turn_id)
        return self.tokenizer.decode(out[0].tolist())


class SFTTrainer(PostTrainer):
    """Supervised fine-tuning: conversations packed into rows, loss on assistant tokens only."""

    what = "conversations"

    def _rows(self, records, train):
        d = self.cfg.data
        seqs, report = tokenize_conversations(records, self.chat, d.seq_len, d.truncation)
        if not seqs:
            raise ConfigError(f"no {'training' if train else 'validation'} conversation is left to train on")
        # Validation rows are packed in file order, training rows in the order of data.seed.
        rows = pack_conversations(seqs, d.seq_len, self.pad_id, d.seed if train else None)
        return rows, report, seqs

    def validate(self, max_batches: int | None = None) -> ValResult:
        def score(batch):
            ce, _, _ = self._loss(batch, 1.0, self.model)
            return ce, (batch["labels"] != IGNORE_INDEX).sum()

        self.model.eval()
        try:
            with torch.no_grad():
                return evaluate(score, map(self._to_device, self._val_batches(max_batches)),
                                reduce=lambda x: all_reduce(x, self.env))
        finally:
            self.model.train()


def run_sft(cfg, source: str | Path, run_dir: str | Path, resume: bool = False, log=print):
    """Supervised fine-tuning of ``source`` on ``cfg.data.path`` into ``run_dir``; returns the ``TrainResult``."""
    from olmo_hybrid.posttrain.config import with_source_model
    from olmo_hybrid.posttrain.source import prepare_source

    src = prepare_source(source, cfg.chat.template, log)
    trainer = SFTTrainer(with_source_model(cfg, src.config), run_dir, src, resume=resume, log=log)
    result = trainer.fit()
    trainer.log(f"validation: {result.final_val_loss:.4f} nats per assistant token "
                f"({result.final_val_bpb:.3f} bits/byte) on {len(trainer.val_rows['input_ids'])} rows")
    return result
