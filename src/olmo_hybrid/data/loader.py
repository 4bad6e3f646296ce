"""Batches of fixed-length sequences cut from the packed token stream, for training and validation.

The training split is cut into windows of ``seq_len + 1`` tokens at stride ``seq_len`` (window ``i``
covers tokens ``[i*T, i*T + T]``: inputs are the first T, labels the last T), so every token is a
label at most once per epoch. Each epoch visits the windows in the order of a permutation drawn from
``numpy.random.default_rng([seed, epoch])``. A step takes the next ``batch_size * world_size``
windows of that order and rank ``r`` gets the ``r``-th block of ``batch_size``; the remainder that
does not fill a global batch is skipped for that epoch (a different remainder every epoch).

The resume state is global, the same on every rank: the epoch and how many windows of its order
have been handed out over all ranks. A run may therefore resume on a different number of ranks and
continue the same global sample order, as long as the global batch (``batch_size * world_size``)
stays the same (e.g. 2 ranks x 4 sequences -> 1 rank x 8).

Batches are ``{"input_ids", "labels"}`` (LongTensor ``[B, T]``) plus, with ``doc_masking``,
``"doc_ids"``: the document index of every input token within the split. It changes exactly after an
eos token, which is where the model masks attention and resets GDN/conv state.

Context parallelism (``cp_degree`` > 1): the ``cp_degree`` ranks of a context-parallel group are one
data-parallel rank (``rank``, ``world_size`` count data-parallel ranks); each gets the same windows and
keeps its slice ``[cp_rank T/n, (cp_rank+1) T/n)`` of every tensor of the batch. The resume state does not
depend on it, so a run moves between CP degrees freely while the global batch stays the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from olmo_hybrid.config import ConfigError
from olmo_hybrid.data.corpus import DataError
from olmo_hybrid.data.dataset import TokenDataset


@dataclass
class DataConfig:
    """Training data. ``path=None`` uses the bundled Shakespeare corpus, tokenized and cached on first use
    (then ``bpe_vocab``, ``val_fraction`` and ``cache_dir`` say how; they are ignored for a given path)."""

    path: str | None = None  # a directory written by `olmo-hybrid prepare`
    seq_len: int = 256
    batch_size: int = 16  # sequences per rank per step
    doc_masking: bool = False  # OLMo Hybrid pretrained without intra-document masking
    seed: int = 0  # order of training windows
    bpe_vocab: int = 4096  # bundled corpus only: BPE size; 0 = the dolma2 tokenizer
    val_fraction: float = 0.05  # bundled corpus only: works held out (0.05 of 42 = 2)
    cache_dir: str | None = None  # bundled corpus only: default $OLMO_HYBRID_CACHE or ~/.cache/olmo_hybrid

    def __post_init__(self):
        for name in ("seq_len", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"data.{name}: must be a positive integer, got {v!r}")
        if not isinstance(self.bpe_vocab, int) or self.bpe_vocab < 0 or 0 < self.bpe_vocab < 259:
            raise ConfigError(f"data.bpe_vocab: must be 0 (dolma2) or at least 259, got {self.bpe_vocab!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction: must be in [0, 1), got {self.val_fraction!r}")

    def resolve_path(self) -> Path:
        """The prepared directory, building the bundled one if ``path`` is None."""
        if self.path is not None:
            return Path(self.path)
        from olmo_hybrid.data.prepare import prepare_bundled

        return prepare_bundled(bpe_vocab=self.bpe_vocab or None, val_fraction=self.val_fraction,
                               cache_dir=self.cache_dir)


def open_datasets(cfg: DataConfig) -> tuple[TokenDataset, TokenDataset | None]:
    """``(train, val)`` for ``cfg``; val is None when the directory has no validation documents.

    Checks that the training split holds at least one sequence of ``cfg.seq_len``.
    """
    path = cfg.resolve_path()
    train = TokenDataset(path, "train")
    train.check_seq_len(cfg.seq_len)
    val = TokenDataset(path, "val")
    return train, (val if val.n_tokens >= 2 else None)


IGNORE_LABEL = -100  # a label that scores nothing (the trainer's cross-entropy ignore index)


def _check_layout(seq_len: int, batch_size: int, rank: int, world_size: int, cp_rank: int, cp_degree: int) -> None:
    """Refuse sizes and ranks that would cut no windows, or the same windows on two ranks."""
    for name, v in (("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise DataError(f"{name} must be a positive integer, got {v!r}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if not 0 <= cp_rank < cp_degree or seq_len % cp_degree:
        raise DataError(f"cp_rank must be in [0, cp_degree={cp_degree}) and cp_degree must divide seq_len="
                        f"{seq_len}, got cp_rank={cp_rank}")


def _make_batch(dataset: TokenDataset, starts: np.ndarray, length: int, doc_masking: bool, cp_rank: int = 0,
                cp_degree: int = 1, pad_to: int = 0) -> dict:
    """Rows of ``length`` inputs from ``starts``; ``pad_to`` > length appends unscored positions (the last token
    and document repeated, labels ``IGNORE_LABEL``): causal models score the real tokens exactly as without
    them. With ``cp_degree`` > 1, slice ``cp_rank`` of every row."""
    positions = starts[:, None] + np.arange(length + 1)
    window = dataset.tokens[positions].astype(np.int64)
    batch = {"input_ids": window[:, :-1], "labels": window[:, 1:]}
    if doc_masking:
        batch["doc_ids"] = dataset.doc_ids(positions[:, :-1]).astype(np.int64)
    if pad_to > length:
        extra = ((0, 0), (0, pad_to - length))
        batch = {k: np.pad(v, extra, constant_values=IGNORE_LABEL) if k == "labels" else np.pad(v, extra, mode="edge")
                 for k, v in batch.items()}
    if cp_degree > 1:
        n = batch["input_ids"].shape[1] // cp_degree
        batch = {k: v[:, cp_rank * n:(cp_rank + 1) * n] for k, v in batch.items()}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


class TrainLoader:
    """Infinite (or ``max_epochs``) iterator of training batches for one rank; resumable mid-epoch.

    ``state_dict()`` is ``{"epoch", "step", ...}`` after the batches handed out so far; a loader built
    the same way that loads it continues with exactly the batches the original would have produced.
    """

    def __init__(self, dataset: TokenDataset, seq_len: int, batch_size: int, seed: int = 0,
                 doc_masking: bool = False, rank: int = 0, world_size: int = 1, max_epochs: int | None = None,
                 cp_rank: int = 0, cp_degree: int = 1):
        _check_layout(seq_len, batch_size, rank, world_size, cp_rank, cp_degree)
        dataset.check_seq_len(seq_len)
        self.cp_rank, self.cp_degree = cp_rank, cp_degree
        self.dataset, self.seq_len, self.batch_size, self.seed = dataset, seq_len, batch_size, seed
        self.doc_masking, self.rank, self.world_size, self.max_epochs = doc_masking, rank, world_size, max_epochs
        self.n_windows = dataset.num_windows(seq_len)
        self.steps_per_epoch = self.n_windows // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise DataError(f"the {dataset.split} split of {dataset.path} has {self.n_windows} sequences of "
                            f"{seq_len} tokens, fewer than one global batch ({batch_size} x {world_size} ranks): "
                            "lower batch_size or seq_len, or use a larger corpus")
        self.epoch, self.consumed = 0, 0  # windows of this epoch's order handed out, over all ranks
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    @classmethod
    def from_config(cls, cfg: DataConfig, dataset: TokenDataset, rank: int = 0, world_size: int = 1,
                    max_epochs: int | None = None, cp_rank: int = 0, cp_degree: int = 1) -> "TrainLoader":
        return cls(dataset, cfg.seq_len, cfg.batch_size, cfg.seed, cfg.doc_masking, rank, world_size, max_epochs,
                   cp_rank, cp_degree)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def window_order(self, epoch: int) -> np.ndarray:
        """The permutation of window indices visited in ``epoch`` (same on every rank)."""
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._order_epoch = epoch
        return self._order

    @property
    def global_batch(self) -> int:
        """Sequences per step over all ranks."""
        return self.batch_size * self.world_size

    def next_batch(self) -> dict:
        if self.consumed + self.global_batch > self.n_windows:
            self.epoch, self.consumed = self.epoch + 1, 0
        if self.max_epochs is not None and self.epoch >= self.max_epochs:
            raise StopIteration
        first = self.consumed + self.rank * self.batch_size
        windows = self.window_order(self.epoch)[first:first + self.batch_size]
        self.consumed += self.global_batch
        return _make_batch(self.dataset, windows * self.seq_len, self.seq_len, self.doc_masking, self.cp_rank,
                           self.cp_degree)

    def __iter__(self) -> Iterator[dict]:
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed per step over all ranks."""
        return self.batch_size * self.world_size * self.seq_len

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "n_windows": self.n_windows,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off; the rank count may differ if the global batch does not."""
        for key in ("seed", "n_windows", "seq_len", "batch_size", "world_size", "epoch"):
            if key not in state:
                raise DataError(f"loader state is missing '{key}'")
        for key in ("seed", "n_windows", "seq_len"):
            if state[key] != getattr(self, key):
                raise DataError(f"loader state was saved with {key}={state[key]}, this loader has "
                                f"{key}={getattr(self, key)}: the remaining batches would differ")
        saved_global = state["batch_size"] * state["world_size"]
        if saved_global != self.global_batch:
            raise DataError(f"loader state was saved with batch_size={state['batch_size']}, this loader has "
                            f"batch_size={self.batch_size} (x world_size {state['world_size']} vs {self.world_size}: "
                            f"a global batch of {saved_global} vs {self.global_batch} sequences): the remaining "
                            f"batches would differ; keep batch_size x world_size the same when resuming")
        if "consumed" in state:
            consumed = int(state["consumed"])
        elif "step" in state:  # the format before 2026-11-22: steps of this epoch
            consumed = int(state["step"]) * saved_global
        else:
            raise DataError("loader state is missing 'consumed'")
        self.epoch, self.consumed = int(state["epoch"]), consumed


def val_batches(dataset: TokenDataset, seq_len: int, batch_size: int, doc_masking: bool = False,
                rank: int = 0, world_size: int = 1, max_batches: int | None = None, cp_rank: int = 0,
                cp_degree: int = 1) -> Iterator[dict]:
    """The whole split in order: windows at stride ``seq_len``, rank ``r`` taking windows ``i % world_size == r``.

    Every token but the first is a label exactly once over all ranks; the tail shorter than
    ``seq_len`` comes last as a batch of one shorter row (with ``cp_degree`` > 1, padded to ``seq_len`` with
    unscored positions, so that it splits into equal slices). ``max_batches`` stops early.
    """
    _check_layout(seq_len, batch_size, rank, world_size, cp_rank, cp_degree)
    if dataset.n_tokens < 2:
        raise DataError(f"the {dataset.split} split of {dataset.path} has no tokens to evaluate")
    n_full = dataset.num_windows(seq_len)
    mine = np.arange(rank, n_full, world_size)
    count = 0
    for i in range(0, len(mine), batch_size):
        if max_batches is not None and count >= max_batches:
            return
        yield _make_batch(dataset, mine[i:i + batch_size] * seq_len, seq_len, doc_masking, cp_rank, cp_degree)
        count += 1
    tail = dataset.n_tokens - 1 - n_full * seq_len
    if tail > 0 and n_full % world_size == rank and (max_batches is None or count < max_batches):
        yield _make_batch(dataset, np.array([n_full * seq_len]), tail, doc_masking, cp_rank, cp_degree,
                          pad_to=seq_len if cp_degree > 1 else 0)
