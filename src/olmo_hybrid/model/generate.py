"""``HybridLM.generate``: a batch of prompts through an engine sized for the call.

The same engine and sampler as ``olmo-hybrid generate`` and ``olmo_hybrid.serve.Engine``, so the same checkpoint,
prompt, settings and seed give the same tokens on every path. Each row gets its own cache slot: a left-padded
batch (``attention_mask``) is stripped of its padding row by row, so every row computes exactly what its prompt
computes alone, and the output keeps the input's padding.
"""

from __future__ import annotations

import torch

from olmo_hybrid.model.engine import Engine
from olmo_hybrid.model.hybrid import HybridLM
from olmo_hybrid.model.sampling import SamplingParams


def _prompts(model: HybridLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """The rows of ``input_ids`` without their left padding, as host lists (ids checked against the vocabulary)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a non-empty integer [batch, seq_len] tensor, got "
                         f"{type(input_ids).__name__} (torch.tensor([ids]) makes one)")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be a non-empty integer [batch, seq_len] tensor, got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    rows = input_ids.tolist()
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        masks = attention_mask.long().tolist()
        for i, m in enumerate(masks):
            if m[-1] != 1 or any(b < a for a, b in zip(m, m[1:])):
                raise ValueError(f"attention_mask row {i} must describe left padding (0s then 1s, last position 1)")
        rows = [row[len(m) - sum(m):] for row, m in zip(rows, masks)]
    vocab = model.config.vocab_size
    for i, row in enumerate(rows):
        bad = next((t for t in row if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"input_ids row {i} has token id {bad} outside the vocabulary [0, {vocab})")
    return rows


@torch.no_grad()
def generate(model: HybridLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, eos_token_id: int | None = None,
             attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None, stop=None,
             tokenizer=None) -> torch.Tensor:
    """``input_ids`` [B, P] plus up to ``max_new_tokens`` new tokens per row -> [B, P + n] (n: the longest row).

    temperature 0 is greedy; otherwise top_k / top_p restrict the draw and ``seed`` fixes it: each row samples
    as ``olmo-hybrid generate --seed SEED`` would for that prompt (None: a seed drawn from torch's global
    generator). A row ends at ``eos_token_id`` (kept), at a ``stop`` string (needs ``tokenizer``; the token that
    completes it is kept) or after ``max_new_tokens``; shorter rows are padded with ``pad_token_id`` (default:
    ``eos_token_id``). ``attention_mask`` [B, P] (1 = token) describes left padding.
    """
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    prompts = _prompts(model, input_ids, attention_mask)
    longest = max(len(p) for p in prompts)
    cfg = model.config
    if cfg.n_attn_layers and longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's limit "
                         f"max_seq_len={cfg.max_seq_len}")
    if max_new_tokens == 0:
        return input_ids.clone()
    training = model.training
    # The engine's default prefill chunk, as in ``olmo-hybrid generate``: the same chunks give the same numerics.
    engine = Engine(model, max_batch=len(prompts), max_context=longest + max_new_tokens, tokenizer=tokenizer,
                    eos_token_id=eos_token_id)
    try:
        outs = engine.generate(prompts, max_new_tokens, sampling, stop=stop, ignore_eos=eos_token_id is None)
    finally:
        model.train(training)
    width = max(len(o.token_ids) for o in outs)
    pad = eos_token_id if pad_token_id is None else pad_token_id
    if pad is None and any(len(o.token_ids) < width for o in outs):
        raise ValueError("rows ended at different lengths: pass pad_token_id (or eos_token_id) to pad them")
    new = torch.tensor([o.token_ids + [pad] * (width - len(o.token_ids)) for o in outs], dtype=input_ids.dtype)
    return torch.cat([input_ids, new.to(input_ids.device)], dim=1)
