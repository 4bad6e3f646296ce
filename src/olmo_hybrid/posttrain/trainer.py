"""Post-training on the project's trainer: the same loop, checkpoints, exact resume, FSDP2 and progress,
with conversations (or pairs) packed into rows instead of a token stream, and weights from a source checkpoint.

``PostTrainer`` overrides the trainer's data hooks (``_open_data``, ``_describe_data``, ``_val_batches``,
``_val_record``, ``_sample_prompt``); ``SFTTrainer`` trains the masked cross-entropy of assistant tokens with the
trainer's own loss (labels are -100 elsewhere, so the loss is the mean over the step's assistant tokens).
``DPOTrainer`` (``dpo.py``) replaces the loss.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from olmo_hybrid.data.chat import ChatTemplate
from olmo_hybrid.data.loader import IGNORE_LABEL
from olmo_hybrid.errors import ConfigError, DataError
from olmo_hybrid.posttrain.config import set_steps
from olmo_hybrid.posttrain.examples import Report, Sequence, check_source, read_records, tokenize_conversations
from olmo_hybrid.posttrain.packing import RowLoader, pack_conversations, split_for_rank
from olmo_hybrid.posttrain.source import Source
from olmo_hybrid.train.loss import ValResult
from olmo_hybrid.train.trainer import Trainer


class PostTrainer(Trainer):
    """A trainer whose model starts from ``source`` and whose data are examples read from ``cfg.data``."""

    what = "examples"

    def __init__(self, cfg, run_dir: str | Path, source: Source, resume: bool = False, log=print,
                 overwrite: bool = False):
        self.source = source
        super().__init__(cfg, run_dir, resume=resume, log=log, overwrite=overwrite)
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
            raise DataError(f"{d.path} has {len(records)} examples: too few to hold out {n_val} for validation")
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
        self.tokenizer, self.data_name = self.source.tokenizer, d.path
        self.chat = ChatTemplate(self.tokenizer)
        train, val = self._split_records()
        self.train_rows, self.train_report, seqs = self._rows(train, train=True)
        self.train_tokens = sum(len(s.ids) for s in seqs)
        self.val_rows, self.val_report, seqs = self._rows(val, train=False)
        scored = int((self.val_rows["labels"] != IGNORE_LABEL).sum())
        self.val_bytes_per_token = sum(s.n_bytes for s in seqs) / max(1, scored)
        self.loader = RowLoader(self.train_rows, d.batch_size, d.seed, self.dp_rank, self.dp_size)
        set_steps(self.cfg, self.loader.steps_per_epoch)

    def _describe_data(self, tokens_per_step: int) -> None:
        d, t = self.cfg.data, self.cfg.trainer
        rows = self.train_rows
        filled = self.train_tokens / rows["input_ids"].size
        trained = int((rows["labels"] != IGNORE_LABEL).sum())
        self.log(f"data: {d.path}: {self.train_report.describe(self.what, d.seq_len)}")
        self.log(f"      {len(rows['input_ids']):,} rows of {d.seq_len} tokens ({filled:.0%} filled), {trained:,} "
                 f"trained tokens; validation: {self.val_report.describe(self.what, d.seq_len)}")
        self.log(f"      {tokens_per_step:,} tokens/step x {t.steps} steps ({self.loader.steps_per_epoch} steps per "
                 f"epoch; chat template of {self.tokenizer.name})")
        return None  # no unigram baseline for responses

    # -- validation and sampling -------------------------------------------------------------------
    def _val_batches(self, max_batches: int | None) -> list[dict]:
        batches = split_for_rank(self.val_rows, self.cfg.data.batch_size, self.dp_rank, self.dp_size)
        return batches[:max_batches] if max_batches else batches

    def _val_record(self, val: ValResult) -> dict:
        return {"val_loss": val.loss, "val_bpb": val.loss / math.log(2) / self.val_bytes_per_token}

    def _sample_prompt(self, prompt: str) -> tuple[list[int], int | None]:
        """``prompt`` sent as one user turn; the reply ends at ``<|im_end|>``."""
        return self.chat.prompt_ids(prompt), self.chat.end_of_turn_id


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


def start(kind: type[PostTrainer], cfg, source: str | Path, run_dir: str | Path, resume: bool = False, log=print,
          overwrite: bool = False) -> PostTrainer:
    """A ``kind`` trainer of ``source`` (prepared: its chat template, its turn tokens) for ``cfg``; ``run_dir`` and
    the data paths are checked before the source is read, so a refused directory or a typo costs nothing."""
    from olmo_hybrid.checkpoint import check_run_dir
    from olmo_hybrid.posttrain.config import with_source_model
    from olmo_hybrid.posttrain.source import prepare_source

    if not cfg.data.path:
        raise ConfigError("data.path is empty: give the JSONL file (or datasets dataset) to train on")
    check_run_dir(run_dir, resume, overwrite)
    for path in filter(None, (cfg.data.path, cfg.data.val_path)):
        check_source(path)
    src = prepare_source(source, cfg.chat.template, log)
    return kind(with_source_model(cfg, src.config), run_dir, src, resume=resume, log=log, overwrite=overwrite)


def run_sft(cfg, source: str | Path, run_dir: str | Path, resume: bool = False, log=print, overwrite: bool = False):
    """Supervised fine-tuning of ``source`` on ``cfg.data.path`` into ``run_dir``; returns the ``TrainResult``."""
    trainer = start(SFTTrainer, cfg, source, run_dir, resume, log, overwrite)
    result = trainer.fit()
    trainer.log(f"validation: {result.final_val_loss:.4f} nats per assistant token "
                f"({result.final_val_bpb:.3f} bits/byte) on {len(trainer.val_rows['input_ids'])} rows")
    return result
