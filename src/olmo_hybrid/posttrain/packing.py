"""Rows of fixed length holding several sequences, and the resumable loader that serves them.

A row is ``seq_len`` positions. Sequence ``j`` of a row occupies ``len(ids)`` consecutive positions and
has ``doc_ids == j``, so the model masks attention across sequences and restarts GDN state and short
convolutions at each start; the padding after the last sequence is a document of its own. Labels are
shifted inside each sequence: position ``k`` is trained to predict ``ids[k + 1]`` when that token is scored
(an assistant token), else its label is -100; a sequence's last position never has a label, so nothing
leaks from one sequence into the next.

SFT packs conversations in a seeded order, one after another, starting a new row when the next one does
not fit ("next fit"); the rows are fixed for the run and every epoch visits them in a new seeded order.
DPO puts one pair per row: chosen (``doc_ids`` 0), then rejected (1).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np
import torch

from olmo_hybrid.data.loader import IGNORE_LABEL
from olmo_hybrid.errors import DataError
from olmo_hybrid.posttrain.examples import Sequence


def next_fit(lengths: Seq[int], seq_len: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``seq_len``, in the given order."""
    rows, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise DataError(f"sequence {i} has {n} tokens, more than a row of {seq_len}")
        if used + n > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


def build_rows(groups: Seq[Seq[Sequence]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """``input_ids``, ``labels``, ``doc_ids`` ([rows, seq_len] int64) for rows of sequences."""
    n = len(groups)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE_LABEL, dtype=np.int64)
    doc_ids = np.empty((n, seq_len), dtype=np.int64)
    for r, group in enumerate(groups):
        pos = 0
        for j, seq in enumerate(group):
            end = pos + len(seq.ids)
            input_ids[r, pos:end] = seq.ids
            labels[r, pos:end - 1] = np.where(seq.scored[1:], seq.ids[1:], IGNORE_LABEL)
            doc_ids[r, pos:end] = j
            pos = end
        doc_ids[r, pos:] = len(group)
    return {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids}


def pack_conversations(seqs: Seq[Sequence], seq_len: int, pad_id: int, seed: int | None) -> dict[str, np.ndarray]:
    """SFT rows: conversations in the order of ``permutation(seed)`` (None: as given), next fit."""
    order = np.arange(len(seqs)) if seed is None else np.random.default_rng(seed).permutation(len(seqs))
    rows = next_fit([len(seqs[i].ids) for i in order], seq_len)
    return build_rows([[seqs[order[i]] for i in row] for row in rows], seq_len, pad_id)


class RowLoader:
    """Batches of ``batch_size`` rows for one rank; every epoch visits the rows in the order of
    ``permutation([seed, epoch])``, rank r taking the r-th block of each global batch; the remainder that
    does not fill a global batch is skipped for that epoch. Its state (epoch, rows handed out over all
    ranks) resumes exactly, on another number of ranks too when the global batch is the same."""

    def __init__(self, rows: dict[str, np.ndarray], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.n_rows, self.seq_len = rows["input_ids"].shape
        self.steps_per_epoch = self.n_rows // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.n_rows} rows of {self.seq_len} tokens are fewer than one global batch "
                            f"({batch_size} x {world_size} ranks): lower data.batch_size or add examples")
        self.epoch, self.consumed = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def next_batch(self) -> dict:
        if self.consumed + self.global_batch > self.n_rows:
            self.epoch, self.consumed = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_rows)
            self._order_epoch = self.epoch
        first = self.consumed + self.rank * self.batch_size
        self.consumed += self.global_batch
        picked = np.sort(self._order[first:first + self.batch_size])
        return {k: torch.from_numpy(v[picked]) for k, v in self.rows.items()}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "n_rows": self.n_rows,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "n_rows", "seq_len"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"loader state was saved with {key}={state.get(key)}, this run has "
                                f"{key}={getattr(self, key)}: the data or its packing changed, so the remaining "
                                "batches would differ")
        if state["batch_size"] * state["world_size"] != self.global_batch:
            raise DataError(f"loader state was saved with a global batch of {state['batch_size'] * state['world_size']} "
                            f"rows, this run has {self.global_batch}: keep batch_size x world_size the same")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


def split_for_rank(rows: dict[str, np.ndarray], batch_size: int, rank: int, world_size: int) -> list[dict]:
    """Validation batches of rank ``rank`` (rows r, r + N, ...). Every rank gets the same number of batches
    (forwards are collective under FSDP); the shorter ones end with batches whose labels are all -100."""
    n = rows["input_ids"].shape[0]
    per_rank = -(-n // world_size)
    n_batches = -(-per_rank // batch_size)
    mine = np.arange(rank, n, world_size)
    batches = []
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        if len(idx) == 0:
            idx = np.array([0])
            batch = {k: torch.from_numpy(v[idx]) for k, v in rows.items()}
            batch["labels"] = torch.full_like(batch["labels"], IGNORE_LABEL)
        else:
            batch = {k: torch.from_numpy(v[idx]) for k, v in rows.items()}
        batches.append(batch)
    return batches
