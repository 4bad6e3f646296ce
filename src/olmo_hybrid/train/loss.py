"""Training loss (cross-entropy + z-loss) and validation loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def loss_terms(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy, summed z-loss term and the number of scored tokens.

    The z-loss (PaLM; OLMo-core's ``z_loss_multiplier``) is ``logsumexp(logits)^2`` per token: it keeps
    the softmax normaliser near 1 so logits do not drift, which matters most in low precision. Both are
    computed in fp32 whatever the autocast dtype. Labels equal to -100 are not scored.
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()
    target = labels.reshape(-1)
    mask = target != IGNORE_INDEX
    ce = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum")
    lse = torch.logsumexp(flat, dim=-1)
    z = (lse.pow(2) * mask).sum()
    return ce, z, mask.sum()


@dataclass
class ValResult:
    loss: float  # mean nats per scored token
    tokens: int


@torch.no_grad()
def evaluate(forward: Callable[[dict], torch.Tensor], batches: Iterable[dict]) -> ValResult:
    """Mean cross-entropy over ``batches``; ``forward(batch)`` returns the logits."""
    nats, tokens = 0.0, 0
    for batch in batches:
        ce, _, n = loss_terms(forward(batch), batch["labels"])
        nats += ce.item()
        tokens += int(n)
    if tokens == 0:
        raise ValueError("validation set is empty: no tokens to score")
    return ValResult(loss=nats / tokens, tokens=tokens)
