"""Row and document helpers shared by the ops: packed (cu_seqlens) <-> padded layouts, reset masks, a decode
step's inactive rows.

Two ways to say where documents start:
- ``cu_seqlens``: int [N+1] offsets into a packed batch of one row (B == 1), ``0 = c_0 <= c_1 <= ... = T``; each
  document gets its own initial/final state row.
- ``reset_mask``: bool [B, T], True where a new document starts: the recurrent state (and the conv context) is
  cleared *before* that token is processed. Any number of documents per row; one initial/final state per row.
"""

from __future__ import annotations

import torch


def cu_seqlens_offsets(cu_seqlens: torch.Tensor, total: int, op: str) -> list[int]:
    """Check the values of ``cu_seqlens`` (shape and dtype are checked by the public op) against a packed length
    ``total`` and return them as a host list."""
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing from 0 to T={total}, got {offsets}")
    return offsets


def pad_varlen(x: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """[1, T, ...] packed documents -> [N, L_max, ...], each document left-aligned and right-padded with zeros."""
    starts = torch.tensor(offsets[:-1], device=x.device)
    lengths = torch.tensor(offsets[1:], device=x.device) - starts
    pos = torch.arange(max(lengths.tolist(), default=0), device=x.device)
    valid = pos < lengths[:, None]
    idx = torch.where(valid, starts[:, None] + pos, 0)
    valid = valid.view(*valid.shape, *([1] * (x.dim() - 2)))
    return x[0][idx].masked_fill(~valid, 0)


def unpad_varlen(y: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Inverse of :func:`pad_varlen`: [N, L_max, ...] -> [1, T, ...]."""
    lengths = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])], device=y.device)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=y.device), lengths)
    pos = torch.arange(offsets[-1], device=y.device) - torch.tensor(offsets[:-1], device=y.device)[doc]
    return y[doc, pos].unsqueeze(0)


def scan_documents(scan, op: str, rows: tuple, state, reset_mask, cu_seqlens):
    """``scan(*rows, state, reset_mask) -> (o, final_state)`` over rows [B, T, H, *]; with ``cu_seqlens`` the
    packed documents of the one row become rows of their own first (each its own state) and ``o`` is packed back."""
    if cu_seqlens is None:
        return scan(*rows, state, reset_mask)
    offsets = cu_seqlens_offsets(cu_seqlens, rows[0].shape[1], op)
    rows = tuple(pad_varlen(x, offsets) for x in rows)
    if reset_mask is not None:
        reset_mask = pad_varlen(reset_mask, offsets)
    o, s = scan(*rows, state, reset_mask)
    return unpad_varlen(o, offsets), s


def step_result(out: torch.Tensor, new_state: torch.Tensor, state: torch.Tensor, active: torch.Tensor | None,
                inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference decode step's ``(out, state)``: rows where ``active`` [B] is False output zeros and keep
    ``state``'s own values; with ``inplace`` the new state is written into ``state``."""
    if active is not None:
        # torch.where, not boolean indexing: no host sync.
        new_state = torch.where(active.view(-1, *[1] * (new_state.dim() - 1)), new_state, state.to(new_state.dtype))
        out = torch.where(active.view(-1, *[1] * (out.dim() - 1)), out, 0)
    if inplace:
        return out, state.copy_(new_state)
    return out, new_state


def reset_mask_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: True where ``doc_ids`` differs from the previous token's (never at t = 0, so a row's first
    document continues from the initial state)."""
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must have shape [B, T], got {tuple(doc_ids.shape)}")
    reset = torch.zeros_like(doc_ids, dtype=torch.bool)
    reset[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return reset
