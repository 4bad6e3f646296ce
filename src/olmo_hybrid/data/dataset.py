"""Read a prepared token directory (see ``prepare.py`` for the layout) and the baselines computed on it."""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path

import numpy as np

from olmo_hybrid.config import read_json_object
from olmo_hybrid.data.corpus import DataError
from olmo_hybrid.data.prepare import FORMAT, FORMAT_VERSION, SPLITS, TOKEN_DTYPE
from olmo_hybrid.data.tokenizer import Tokenizer, load_tokenizer


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / "manifest.json"
    if not path.is_dir():
        raise DataError(f"dataset directory {path} " + ("is a file" if path.exists() else "does not exist")
                        + " (create one with `olmo-hybrid prepare`)")
    if not file.is_file():
        raise DataError(f"{path} is not a prepared dataset: no manifest.json (create it with `olmo-hybrid prepare`)")
    manifest = read_json_object(file, what="dataset manifest", error=DataError)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{file}: format {manifest.get('format')!r} version {manifest.get('format_version')!r} "
                        f"is not {FORMAT!r} version {FORMAT_VERSION}; prepare the data again")
    return manifest


class TokenDataset:
    """One split of a prepared directory: a read-only memmap of uint32 token ids plus document offsets.

    ``tokens[offsets[i]:offsets[i + 1]]`` is document ``i`` (ending with the eos id); ``n_bytes`` is
    the UTF-8 size of the split's text, for bits per byte.
    """

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
        self.split = split
        if "bos_token_id" not in self.manifest and self.tokenizer().bos_token_id is not None:
            raise DataError(f"{self.path} was prepared before documents began with the BOS its tokenizer adds "
                            "(as transformers encodes them); prepare the data again")
        info = self.manifest["splits"][split]
        self.n_tokens, self.n_docs, self.n_bytes = int(info["tokens"]), int(info["documents"]), int(info["bytes"])
        self.eos_token_id = int(self.manifest["eos_token_id"])
        self.vocab_size = int(self.manifest["vocab_size"])
        tokens_file = self.path / info["tokens_file"]
        size = tokens_file.stat().st_size if tokens_file.is_file() else -1
        if size != 4 * self.n_tokens:
            raise DataError(f"{tokens_file}: expected {4 * self.n_tokens} bytes ({self.n_tokens} uint32 tokens), "
                            f"found {'no file' if size < 0 else f'{size} bytes'}; prepare the data again")
        self.tokens = (np.memmap(tokens_file, dtype=TOKEN_DTYPE, mode="r") if self.n_tokens
                       else np.zeros(0, dtype=TOKEN_DTYPE))  # numpy cannot map an empty file
        self.offsets = np.load(self.path / info["offsets_file"])
        self.source_index = np.load(self.path / info["source_index_file"])
        if len(self.offsets) != self.n_docs + 1 or self.offsets[-1] != self.n_tokens:
            raise DataError(f"{self.path / info['offsets_file']} does not match the manifest; prepare the data again")

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.path)!r}, {self.split!r}: {self.n_docs} docs, {self.n_tokens} tokens)"

    def document(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]])

    def doc_ids(self, positions: np.ndarray) -> np.ndarray:
        """Index of the document holding each token position (an eos belongs to the document it ends)."""
        return np.searchsorted(self.offsets, positions, side="right") - 1

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path)

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / self.n_tokens if self.n_tokens else float("nan")

    def num_windows(self, seq_len: int) -> int:
        """Training windows of ``seq_len`` inputs (+1 label) cut at stride ``seq_len`` from the stream."""
        return max(0, (self.n_tokens - 1) // seq_len)

    def check_seq_len(self, seq_len: int) -> None:
        if self.n_tokens < seq_len + 1:
            raise DataError(f"the {self.split} split of {self.path} has {self.n_tokens} tokens, fewer than one "
                            f"training sequence needs ({seq_len} inputs + 1 label = {seq_len + 1}): "
                            "use a larger corpus or a shorter seq_len")

    @cached_property
    def token_counts(self) -> np.ndarray:
        return np.bincount(np.asarray(self.tokens), minlength=self.vocab_size).astype(np.int64)


def unigram_loss(train: TokenDataset, val: TokenDataset, smoothing: float = 1.0) -> float:
    """Cross-entropy (nats/token) on ``val`` of a unigram model fit on ``train``, add-``smoothing``.

    Scored on the tokens a language model predicts in ``val_batches`` (all but the first), so the
    number is directly comparable with the validation loss.
    """
    if train.manifest["tokenizer"]["sha256"] != val.manifest["tokenizer"]["sha256"]:
        raise DataError("unigram_loss: train and val were tokenized with different tokenizers")
    if val.n_tokens < 2:
        raise DataError(f"unigram_loss: the {val.split} split of {val.path} has fewer than 2 tokens")
    counts = train.token_counts.astype(np.float64)
    logp = np.log(counts + smoothing) - math.log(counts.sum() + smoothing * train.vocab_size)
    scored = np.bincount(np.asarray(val.tokens[1:]), minlength=val.vocab_size)
    return float(-(scored * logp).sum() / scored.sum())


def bits_per_byte(loss_nats_per_token: float, dataset: TokenDataset) -> float:
    """Convert a mean loss over ``dataset``'s tokens to bits per UTF-8 byte of its text."""
    return loss_nats_per_token / math.log(2) / dataset.bytes_per_token
