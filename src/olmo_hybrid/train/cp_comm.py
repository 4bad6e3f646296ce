"""The collectives of context parallelism, differentiable, over one CP group (``CPGroup``).

Built on PyTorch's functional collectives, whose autograd formulas send the gradients back the way the values
came (an all-to-all's backward is the reverse all-to-all, an all-gather's a reduce-scatter) and which
``torch.compile`` traces without graph breaks. A collective's backward runs only on ranks whose graph reaches
it, so every caller here uses what it receives in the same way on every rank (masking what a rank must not use
instead of skipping it): the ranks then run the same backward, with the collectives in the same order.

``CPGroup.sent`` (a Counter, None unless a test or benchmark sets it) adds up the bytes this rank sends in eager
mode per ``(label, "forward" | "backward")``: an all-to-all sends (n-1)/n of its input, an all-gather of x sends (n-1)
copies of x (ring), and its backward, a reduce-scatter, sends as much.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed._functional_collectives as funcol


@dataclass
class CPGroup:
    """A context-parallel group: ``degree`` ranks, this one ``rank`` of them, sharing every sequence of a batch;
    rank r holds tokens [r T / degree, (r + 1) T / degree) of each row."""

    group: object  # torch.distributed ProcessGroup
    rank: int
    degree: int
    sent: Counter | None = field(default=None, compare=False)

    def local(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of a whole-sequence tensor along ``dim``."""
        n = x.shape[dim] // self.degree
        return x.narrow(dim, self.rank * n, n)

    def count(self, label: str, x: torch.Tensor, copies: float) -> None:
        """Record ``copies`` x the bytes of ``x`` sent in forward, and the same in backward when ``x`` has a
        gradient (counted by a hook when that gradient arrives)."""
        if self.sent is None or torch.compiler.is_compiling():  # a measurement of eager runs only
            return
        nbytes = int(x.numel() * x.element_size() * copies)
        self.sent[(label, "forward")] += nbytes
        if x.requires_grad:
            def on_grad(grad, sent=self.sent):
                sent[(label, "backward")] += nbytes
            x.register_hook(on_grad)


def refuse_state(initial_state, output_final_state) -> None:
    """The context-parallel op modules run whole sequences from a zero state: no cache prefill."""
    if initial_state is not None or output_final_state:
        raise ValueError("a context-parallel model runs whole sequences from a zero state only (no cache)")


def _all_to_all(x: torch.Tensor, cp: CPGroup, label: str) -> torch.Tensor:
    """Chunk i of dim 0 of ``x`` [n, ...] goes to rank i; returns [n, ...] whose chunk i came from rank i."""
    cp.count(label, x, (cp.degree - 1) / cp.degree)
    return funcol.all_to_all_single_autograd(x.contiguous(), None, None, cp.group)


def all_gather(x: torch.Tensor, cp: CPGroup, label: str) -> torch.Tensor:
    """[n, *x.shape]: every rank's ``x`` in rank order; the gradient of each entry returns to its owner, summed
    over the ranks that used it."""
    cp.count(label, x, cp.degree - 1)
    out = funcol.all_gather_single_autograd(x.contiguous(), 0, cp.group)
    return out.view(cp.degree, *x.shape)


def seq_to_heads(tensors: list[torch.Tensor], cp: CPGroup, label: str) -> list[torch.Tensor]:
    """Sequence sharding -> head sharding: each [B, T/n, G, c] (G head groups, a multiple of n) becomes
    [B, T, G/n, c], the whole sequence for this rank's G/n groups. Tensors of one dtype travel in one all-to-all."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        x = torch.cat([tensors[i] for i in idx], dim=-1)
        b, tl, g, c = x.shape
        send = x.view(b, tl, cp.degree, g // cp.degree, c).permute(2, 0, 1, 3, 4)  # chunk j: rank j's heads
        recv = _all_to_all(send, cp, label)  # chunk i: my heads over rank i's slice of the sequence
        whole = recv.permute(1, 0, 2, 3, 4).reshape(b, cp.degree * tl, g // cp.degree, c)
        for i, part in zip(idx, whole.split([tensors[i].shape[-1] for i in idx], dim=-1)):
            out[i] = part
    return out


def heads_to_seq(x: torch.Tensor, cp: CPGroup, label: str) -> torch.Tensor:
    """Head sharding -> sequence sharding, the inverse of :func:`seq_to_heads`: [B, T, G/n, c] -> [B, T/n, G, c]."""
    b, t, gl, c = x.shape
    tl = t // cp.degree
    send = x.view(b, cp.degree, tl, gl, c).permute(1, 0, 2, 3, 4)  # chunk j: rank j's slice of the sequence
    recv = _all_to_all(send, cp, label)  # chunk i: rank i's heads over my slice
    return recv.permute(1, 2, 0, 3, 4).reshape(b, tl, cp.degree * gl, c)


def gather_sequence(x: torch.Tensor, cp: CPGroup, label: str) -> torch.Tensor:
    """The whole sequences [B, T, ...] from every rank's slice [B, T/n, ...] (no gradient: for ids and masks)."""
    cp.count(label, x, cp.degree - 1)
    parts = funcol.all_gather_single(x.contiguous(), 0, cp.group).view(cp.degree, *x.shape)
    return torch.cat(parts.unbind(0), dim=1)
