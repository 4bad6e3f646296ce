"""Generation with the hybrid cache: chunked prefill, then one token at a time.

This is the simple, exact path (any device, any dtype). Left-padded batches are supported: padding is
its own segment, so each row computes exactly what it would alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from olmo_hybrid.model.hybrid import HybridLM


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, vocab]: argmax at temperature 0, else sample."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p (the top token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_request(model: HybridLM, input_ids: torch.Tensor, max_new_tokens: int,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
    cfg = model.config
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq_len] tensor, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = input_ids.shape[1] + max_new_tokens
    if cfg.n_attn_layers and total > cfg.max_seq_len:
        raise ValueError(f"prompt of {input_ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the "
                         f"model's limit max_seq_len={cfg.max_seq_len}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    mask = attention_mask.long()
    if (mask[:, 1:] < mask[:, :-1]).any() or (mask[:, -1] == 0).any():
        raise ValueError("attention_mask must describe left padding (0s then 1s, last position 1 in every row)")
    return mask


@torch.no_grad()
def stream_generate(
    model: HybridLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    prefill_chunk: int = 2048,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ([B] LongTensor) until ``max_new_tokens`` or all rows hit EOS.

    Rows that have finished keep yielding ``pad_token_id`` (default: ``eos_token_id``).
    """
    docs = _check_request(model, input_ids, max_new_tokens, attention_mask)
    if max_new_tokens == 0:
        return
    b, p = input_ids.shape
    positions = (docs.cumsum(-1) - 1).clamp(min=0)
    cache = model.new_cache(b, p + max_new_tokens)
    for s in range(0, p, prefill_chunk):
        e = min(p, s + prefill_chunk)
        logits = model(input_ids[:, s:e], doc_ids=docs[:, s:e], position_ids=positions[:, s:e], cache=cache,
                       logits_to_keep=1)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    next_pos = positions[:, -1:] + 1
    ones = torch.ones(b, 1, dtype=torch.long, device=input_ids.device)
    for i in range(max_new_tokens):
        token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, pad), token)
            finished |= token == eos_token_id
        yield token
        if i == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            return
        logits = model(token[:, None], doc_ids=ones, position_ids=next_pos, cache=cache, logits_to_keep=1)
        next_pos = next_pos + 1


def generate(model: HybridLM, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """Prompt plus up to ``max_new_tokens`` new tokens per row ([B, P + n]); greedy at temperature 0."""
    tokens = list(stream_generate(model, input_ids, max_new_tokens, **kwargs))
    if not tokens:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
