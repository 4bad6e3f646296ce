"""Checking generated tokens against the model's own full forward pass (teacher forcing).

One causal forward over prompt + generated tokens gives, at every position, the logits a loop of full forwards
would have computed for that prefix. A greedy token that differs from their argmax is a disagreement; its
logit gap (argmax minus chosen) tells a real bug (large gap) from a near-tie decided by rounding (tiny gap,
expected in bf16 with random weights, whose logits are flat). Teacher forcing keeps one early near-tie from
making the rest of the sequence incomparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from olmo_hybrid.model.hybrid import HybridLM


@dataclass(frozen=True)
class Disagreement:
    index: int  # position among the generated tokens
    token: int  # what was generated
    argmax: int  # what the full forward prefers
    gap: float  # logit(argmax) - logit(token) >= 0
    spread: float  # standard deviation of the logits there, to judge the gap


@torch.no_grad()
def teacher_forced_logits(model: HybridLM, prompt: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """fp32 logits [len(tokens), V] of one full forward over ``prompt`` + ``tokens``: row j predicts token j."""
    new = torch.tensor(tokens, dtype=torch.long, device=prompt.device)
    ids = torch.cat([prompt, new])[None, :-1]
    return model(ids, logits_to_keep=len(tokens))[0].float()


@torch.no_grad()
def greedy_disagreements(model: HybridLM, prompt: torch.Tensor, tokens: list[int]) -> list[Disagreement]:
    """Where greedy ``tokens`` generated after ``prompt`` [P] differ from the full forward's argmax."""
    if not tokens:
        return []
    new = torch.tensor(tokens, dtype=torch.long, device=prompt.device)
    logits = teacher_forced_logits(model, prompt, tokens)
    argmax = logits.argmax(dim=-1)
    out = []
    for j in (argmax != new).nonzero()[:, 0].tolist():
        gap = float(logits[j, argmax[j]] - logits[j, new[j]])
        out.append(Disagreement(j, tokens[j], int(argmax[j]), gap, float(logits[j].std())))
    return out
