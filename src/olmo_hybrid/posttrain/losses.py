"""Direct preference optimisation: per-sequence log-probabilities of a packed batch and the two DPO losses.

With ``pi_c, pi_r`` the policy's log-probabilities of the chosen and rejected responses and ``ref_c, ref_r``
the frozen reference model's, and ``z = (pi_c - pi_r) - (ref_c - ref_r)``:

* ``dpo`` (Rafailov et al., 2023): ``loss = -log sigmoid(beta * z)`` with each log-probability the **sum**
  over the response's tokens.
* ``dpo_norm`` (the variant OLMo Hybrid's Instruct-DPO used, with beta = 5: Merrill et al. 2026, arXiv:2604.03444,
  section 6; defined in open-instruct's ``dpo_utils.py`` as DPO on ``average_log_prob``): the same formula
  with each log-probability the **mean** over the response's tokens, for policy and reference alike, so a
  long response does not dominate by its length.

Rewards are ``beta * (pi - ref)`` (the same normalisation); reward accuracy is the fraction of pairs whose
chosen reward exceeds the rejected one, and the margin is their difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from olmo_hybrid.data.loader import IGNORE_LABEL

LOSSES = ("dpo", "dpo_norm")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor, n_seqs: int = 2
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, counts)`` ([rows, n_seqs]): the summed log-probability of the scored labels of sequences
    ``0 .. n_seqs-1`` of every row (``doc_ids`` says which sequence a position belongs to), in fp32."""
    logp = -F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_LABEL,
                            reduction="none").view(labels.shape)
    scored = labels != IGNORE_LABEL
    member = (doc_ids[..., None] == torch.arange(n_seqs, device=doc_ids.device)) & scored[..., None]
    return (logp[..., None] * member).sum(1), member.sum(1)


def response_logps(sums: torch.Tensor, counts: torch.Tensor, loss: str) -> torch.Tensor:
    """The log-probability DPO compares: the sum (``dpo``) or the per-token mean (``dpo_norm``)."""
    if loss not in LOSSES:
        raise ValueError(f"dpo.loss: expected one of {', '.join(LOSSES)}, got {loss!r}")
    return sums / counts.clamp(min=1) if loss == "dpo_norm" else sums


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ``(loss, chosen_reward, rejected_reward)``; the rewards are detached."""
    z = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    loss = -F.logsigmoid(beta * z)
    return loss, (beta * (pi_chosen - ref_chosen)).detach(), (beta * (pi_rejected - ref_rejected)).detach()
