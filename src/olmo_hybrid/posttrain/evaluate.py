"""Judge a chat model on questions with known answers: greedy replies and exact match, and the log-probability
margin it gives a correct answer over a wrong one."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from olmo_hybrid.data.chat import ChatTemplate
from olmo_hybrid.posttrain.examples import Sequence as Tokenized
from olmo_hybrid.posttrain.examples import tokenize_pairs
from olmo_hybrid.posttrain.losses import sequence_logps
from olmo_hybrid.posttrain.packing import build_rows


@torch.no_grad()
def greedy_replies(model, chat: ChatTemplate, questions: Sequence[str], max_new_tokens: int = 16,
                   batch_size: int = 64) -> list[str]:
    """Each question sent as one user turn; the greedy reply up to ``<|im_end|>`` (or ``max_new_tokens``).
    Prompts of equal length are batched together, so no row is padded."""
    model.eval()
    device = next(model.parameters()).device
    prompts = [chat.prompt_ids(q) for q in questions]
    by_length = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)
    stop = chat.end_of_turn_id
    replies = [""] * len(questions)
    for n, members in by_length.items():
        for start in range(0, len(members), batch_size):
            idx = members[start:start + batch_size]
            ids = torch.tensor([prompts[i] for i in idx], device=device)
            out = model.generate(ids, max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=stop)
            for i, row in zip(idx, out[:, n:].tolist()):
                replies[i] = chat.tokenizer.decode(row[:row.index(stop)] if stop in row else row)
    return replies


def exact_match(replies: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of replies equal to their answer (surrounding whitespace ignored)."""
    return sum(r.strip() == a.strip() for r, a in zip(replies, answers)) / max(1, len(answers))


@torch.no_grad()
def preference_margin(model, chat: ChatTemplate, pairs: Sequence[dict], seq_len: int, batch_size: int = 64
                      ) -> tuple[float, float]:
    """``(mean margin, accuracy)``: the mean of log p(chosen) - log p(rejected) (summed over the response
    tokens) over preference records, and how often it is positive."""
    model.eval()
    device = next(model.parameters()).device
    tokenized, _ = tokenize_pairs(((f"pair {i}", p) for i, p in enumerate(pairs)), chat, seq_len, "error")
    margins = []
    for start in range(0, len(tokenized), batch_size):
        group: list[tuple[Tokenized, Tokenized]] = [(p.chosen, p.rejected) for p in tokenized[start:start + batch_size]]
        rows = {k: torch.from_numpy(v).to(device) for k, v in build_rows(group, seq_len, 0).items()}
        sums, _ = sequence_logps(model(rows["input_ids"], doc_ids=rows["doc_ids"]), rows["labels"], rows["doc_ids"])
        margins.append(sums[:, 0] - sums[:, 1])
    m = torch.cat(margins)
    return float(m.mean()), float((m > 0).float().mean())
