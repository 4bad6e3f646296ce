"""The model post-training starts from: a run directory or a Hugging Face checkpoint, with the chat template
the run will use and the turn tokens that template needs.

A tokenizer without ``<|im_start|>`` / ``<|im_end|>`` (the tiny recipe's 4,096-id BPE of the bundled corpus)
gets them as new special tokens at the end of its vocabulary, and the model's embedding and LM head grow to
the new padded size. New rows start at the mean of the existing rows (input and output alike), so the new
tokens begin as an "average" token rather than a random direction (the embedding resize of Hewitt, 2021,
"Initializing new word embeddings for pretrained language models"). The tokenizer's name gains ``+chat``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch

from olmo_hybrid.config import ModelConfig
from olmo_hybrid.data import Tokenizer
from olmo_hybrid.data.chat import TURN_TOKENS, resolve_template


@dataclass
class Source:
    path: Path
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer  # chat_template set to the run's template
    added_tokens: tuple[str, ...] = ()


def with_tokens(tokenizer: Tokenizer, tokens: tuple[str, ...]) -> Tokenizer:
    """A copy of ``tokenizer`` with ``tokens`` appended as special tokens."""
    backend = tokenizers.Tokenizer.from_str(tokenizer.to_json())
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in tokens])
    return Tokenizer(backend, f"{tokenizer.name}+chat", tokenizer.eos_token, tokenizer.pad_token,
                     tokenizer.chat_template, tokenizer.named_tokens)


def init_token_rows(state: dict[str, torch.Tensor], config: ModelConfig, used: int, added: int, vocab_size: int
                    ) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Embedding and LM head with rows ``used .. used + added - 1`` (the new tokens) set to the mean of rows
    ``:used``, grown with mean rows to ``vocab_size`` rows when that is more than the model has."""
    from dataclasses import replace

    vocab_size = max(config.vocab_size, vocab_size)
    out = dict(state)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name == "lm_head.weight" and config.tie_embeddings:
            out[name] = out["model.embed_tokens.weight"]
            continue
        w = state[name]
        mean = w[:used].mean(0, keepdim=True)
        grown = torch.cat([w, mean.expand(vocab_size - w.shape[0], -1)])
        grown[used:used + added] = mean
        out[name] = grown
    return out, replace(config, vocab_size=vocab_size)


def prepare_source(path: str | Path, template: str = "", log=print) -> Source:
    """Load the source, choose its chat template (``chat.template``, else its tokenizer's, else ours) and add
    the turn tokens the template uses that the tokenizer lacks (growing the model to match)."""
    from olmo_hybrid.checkpoint import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(path, device="cpu", log=log)
    tok.chat_template = resolve_template(template, tok)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    config = model.config
    missing = tuple(t for t in TURN_TOKENS if t in tok.chat_template and tok.backend.token_to_id(t) is None)
    if missing:
        used = tok.vocab_size
        tok = with_tokens(tok, missing)
        state, config = init_token_rows(state, config, used, len(missing), tok.padded_vocab_size())
        log(f"chat: added {', '.join(missing)} to tokenizer {tok.name} (ids {used}-{tok.vocab_size - 1}); "
            f"model vocabulary {model.config.vocab_size} -> {config.vocab_size}, new rows at the mean embedding")
    return Source(Path(path), config, state, tok, missing)
