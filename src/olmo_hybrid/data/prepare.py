"""Tokenize a corpus into packed token shards with a held-out validation split.

A prepared directory holds, per split (``train``, ``val``):

* ``{split}.tokens.bin``   every document's token ids (what the tokenizer's own encoding gives, so a BOS first
  when it adds one, as transformers' ``tokenizer(text)``) followed by the eos id, concatenated (raw
  little-endian uint32, numpy dtype ``<u4``, read with ``numpy.memmap``);
* ``{split}.offsets.npy``  int64 ``[documents + 1]``: document ``i`` is ``tokens[offsets[i]:offsets[i+1]]``;
* ``{split}.source_index.npy`` int64 ``[documents]``: each document's index in the input order;

plus ``tokenizer.json`` / ``tokenizer_config.json`` and ``manifest.json`` (format version, tokenizer,
counts of documents, tokens and UTF-8 bytes per split, source, seed, creation time).

The validation split is chosen by document: ``round(val_fraction * N)`` of the N non-empty documents
(at least one, at most N - 1), drawn with ``numpy.random.default_rng(seed)``, so it is the same for
the same corpus, fraction and seed whatever the number of workers. A trained BPE sees only the
training documents. Everything is written into a temporary sibling directory that replaces the
output directory only once complete, so a failure leaves the previous contents untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from olmo_hybrid.data.corpus import SHAKESPEARE_ASSET, DataError, Document, FileDocuments, HFDocuments, \
    ListDocuments, bundled_corpus
from olmo_hybrid.data.tokenizer import DOLMA2, Tokenizer, check_bpe_vocab, load_tokenizer, train_bpe
from olmo_hybrid.errors import WriteError
from olmo_hybrid.fsio import failure_reason, install_dir, staging_dir

FORMAT = "olmo-hybrid-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
TOKEN_DTYPE = np.dtype("<u4")  # little-endian uint32 whatever the machine
_CHUNK_CHARS = 4 << 20  # text per tokenization task: many documents for the library's threads, few pickles
# Below this many cores, one process using the tokenizers library's own threads beats a pool of
# single-threaded workers (16-core machine: 1 process 1.2M tok/s, 2 workers 0.45M, 8 workers 1.4M, 16 workers 2.4M).
_MIN_CORES_FOR_POOL = 8


# --------------------------------------------------------------------------------------------------
# Progress line


class _Progress:
    """Documents/s, tokens/s and ETA on stderr: rewritten in place on a terminal, every 10 s otherwise."""

    def __init__(self, source, enabled: bool):
        self.source, self.enabled = source, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start = self.last = time.monotonic()
        self.docs = self.tokens = 0

    def update(self, docs: int, tokens: int, final: bool = False) -> None:
        self.docs += docs
        self.tokens += tokens
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < (0.5 if self.tty else 10.0)):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        frac = self.source.progress_done / self.source.progress_total if self.source.progress_total else 0.0
        eta = f"{elapsed * (1 - frac) / frac:5.0f}s" if 0 < frac < 1 and not final else "  -  "
        line = (f"prepare: {self.docs:,} docs {self.tokens:,} tokens | {self.docs / elapsed:,.1f} docs/s "
                f"{self.tokens / elapsed:,.0f} tok/s | {100 * min(frac, 1.0):3.0f}% ETA {eta}")
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Tokenization, in this process or in a pool of workers

_worker_tok: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool provides the parallelism
    import tokenizers

    _worker_tok = Tokenizer(tokenizers.Tokenizer.from_str(tokenizer_json), "worker", eos_token=None)


@contextlib.contextmanager
def _worker_pool(tok: Tokenizer, workers: int):
    """A pool of tokenizing processes, forked on Linux (no re-import of ``__main__``), spawned elsewhere.

    The tokenizers library turns its own threads off in a forked child, and warns on stderr unless
    TOKENIZERS_PARALLELISM is set; it is set (to false) only while the workers are forked.
    """
    method = "fork" if sys.platform == "linux" else "spawn"
    unset = "TOKENIZERS_PARALLELISM" not in os.environ
    if unset:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context(method).Pool(workers, _init_worker, (tok.to_json(),))
    finally:
        if unset:
            del os.environ["TOKENIZERS_PARALLELISM"]
    with pool:
        yield pool


def _encode_chunk(texts: list[str], tok: Tokenizer | None = None) -> list[tuple[np.ndarray, int]]:
    tok = tok or _worker_tok
    return [(np.asarray(ids, dtype=TOKEN_DTYPE), len(t.encode("utf-8")))
            for ids, t in zip(tok.encode_batch(texts), texts)]


def _chunks(docs: Iterable[tuple[int, Document]]) -> Iterator[tuple[list[int], list[str]]]:
    index: list[int] = []
    texts: list[str] = []
    size = 0
    for i, doc in docs:
        index.append(i)
        texts.append(doc.text)
        size += len(doc.text)
        if size >= _CHUNK_CHARS:
            yield index, texts
            index, texts, size = [], [], 0
    if texts:
        yield index, texts


def _encoded(source, tok: Tokenizer, workers: int) -> Iterator[tuple[list[int], list[tuple[np.ndarray, int]]]]:
    """Yield ``(doc indices, [(ids, utf8 bytes)])`` per chunk, in input order."""
    chunks = _chunks(enumerate(source))
    if workers <= 1:
        for index, texts in chunks:
            yield index, _encode_chunk(texts, tok)
        return
    with _worker_pool(tok, workers) as pool:
        pending = ((index, pool.apply_async(_encode_chunk, (texts,))) for index, texts in chunks)
        window: list = []
        for item in pending:  # keep 2 tasks per worker in flight, consume results in order
            window.append(item)
            if len(window) >= 2 * workers:
                index, result = window.pop(0)
                yield index, result.get()
        for index, result in window:
            yield index, result.get()


# --------------------------------------------------------------------------------------------------
# Output directory handling


def _split_files(split: str) -> dict[str, str]:
    return {"tokens_file": f"{split}.tokens.bin", "offsets_file": f"{split}.offsets.npy",
            "source_index_file": f"{split}.source_index.npy"}


# Everything a prepared directory holds; replacing one that holds anything else would delete it.
_OUTPUT_FILES = {"manifest.json", "tokenizer.json", "tokenizer_config.json",
                 *(name for s in SPLITS for name in _split_files(s).values())}


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise DataError(f"output directory {out} is not empty and holds no prepared dataset (no manifest.json): "
                        "refusing to replace it; choose a new or empty directory")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _OUTPUT_FILES) if out.is_dir() else []
    if foreign:
        raise DataError(f"output directory {out} holds a prepared dataset and {len(foreign)} other entries "
                        f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}) that replacing it would "
                        "delete: move them out or choose another directory")


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def _write_manifest(path: Path, manifest: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------
# prepare


def default_workers() -> int:
    cores = os.cpu_count() or 1
    return cores if cores >= _MIN_CORES_FOR_POOL else 1


def choose_val_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over ``n_docs`` documents marking the validation split."""
    mask = np.zeros(n_docs, dtype=bool)
    if val_fraction <= 0:
        return mask
    if n_docs < 2:
        raise DataError(f"cannot hold out a validation split from {n_docs} document(s): give more documents "
                        "(in a text file, separate them with lines '<|endoftext|>') or hold out none "
                        "(val_fraction 0, --val-fraction 0)")
    n_val = min(n_docs - 1, max(1, round(val_fraction * n_docs)))
    mask[np.random.default_rng(seed).choice(n_docs, size=n_val, replace=False)] = True
    return mask


def _resolve_tokenizer(tokenizer: str | Tokenizer, bpe_vocab: int | None, source, is_val: np.ndarray) -> Tokenizer:
    if bpe_vocab is not None:  # 0 too: train_bpe refuses it rather than silently using another tokenizer
        train_texts = (d.text for i, d in enumerate(source) if not is_val[i])
        return train_bpe(train_texts, bpe_vocab)
    return tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)


def _write_splits(tmp: Path, source, tok: Tokenizer, is_val: np.ndarray, workers: int, progress: bool) -> dict:
    """Tokenize every document into its split's files under ``tmp``; return the per-split manifest entries."""
    offsets = {s: [0] for s in SPLITS}
    source_index: dict[str, list[int]] = {s: [] for s in SPLITS}
    n_bytes = dict.fromkeys(SPLITS, 0)
    eos = np.array([tok.eos_token_id], dtype=TOKEN_DTYPE).tobytes()
    bar = _Progress(source, progress)
    with (open(tmp / _split_files("train")["tokens_file"], "wb") as train_f,
          open(tmp / _split_files("val")["tokens_file"], "wb") as val_f):
        files = {"train": train_f, "val": val_f}
        for index, encoded in _encoded(source, tok, workers):
            chunk_tokens = 0
            for i, (ids, nbytes) in zip(index, encoded):
                split = "val" if is_val[i] else "train"
                files[split].write(ids.tobytes())
                files[split].write(eos)
                offsets[split].append(offsets[split][-1] + len(ids) + 1)
                source_index[split].append(i)
                n_bytes[split] += nbytes
                chunk_tokens += len(ids) + 1
            bar.update(len(index), chunk_tokens)
        bar.update(0, 0, final=True)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    splits = {}
    for s in SPLITS:
        _save_array(tmp / _split_files(s)["offsets_file"], np.asarray(offsets[s], dtype=np.int64))
        _save_array(tmp / _split_files(s)["source_index_file"], np.asarray(source_index[s], dtype=np.int64))
        splits[s] = {"documents": len(source_index[s]), "tokens": offsets[s][-1], "bytes": n_bytes[s],
                     **_split_files(s)}
    return splits


def _prepare(source, out: Path, tokenizer, bpe_vocab, val_fraction, seed, workers, progress, extra) -> Path:
    t0 = time.monotonic()
    out = Path(out).absolute()
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0 <= seed < 2**32:  # what numpy's generators take
        raise DataError(f"seed must be in [0, 2**32), got {seed}")
    _check_replaceable(out)
    n_docs = sum(1 for _ in source)  # a cheap first pass: the split needs the document count
    if n_docs == 0:
        raise DataError(f"the corpus has no non-empty documents ({json.dumps(source.description)[:300]})")
    is_val = choose_val_documents(n_docs, val_fraction, seed)
    if progress:
        print(f"prepare: {n_docs:,} documents, {int(is_val.sum()):,} held out for validation"
              + (f"; training a BPE of {bpe_vocab} ids on the rest" if bpe_vocab is not None else ""), file=sys.stderr)
    tok = _resolve_tokenizer(tokenizer, bpe_vocab, source, is_val)
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {tok.name} has no end-of-document token; documents need one")

    tmp = None
    try:
        tmp = staging_dir(out)
        splits = _write_splits(tmp, source, tok, is_val, workers or default_workers(), progress)
        tok.save(tmp)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": source.description,
            "tokenizer": {"name": tok.name, "trained_bpe": bool(bpe_vocab), "sha256": tok.fingerprint,
                          "file": "tokenizer.json"},
            "vocab_size": tok.vocab_size, "padded_vocab_size": tok.padded_vocab_size(),
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "dtype": TOKEN_DTYPE.str, "val_fraction": val_fraction, "seed": seed,
            "splits": splits, "seconds": round(time.monotonic() - t0, 3), **extra,
        }
        _write_manifest(tmp / "manifest.json", manifest)
        install_dir(tmp, out)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # reading errors are DataErrors already: this one is a write
            kept = f"{out} is unchanged" if out.exists() else f"nothing was written to {out}"
            raise WriteError(f"could not write the prepared dataset {out}: {failure_reason(e)}; {kept}") from e
        raise
    return out


def prepare(inputs: Sequence[str | Path] | None, out_dir: str | Path, *, tokenizer: str | Tokenizer = DOLMA2,
            bpe_vocab: int | None = None, val_fraction: float = 0.05, seed: int = 0, workers: int | None = None,
            text_field: str = "text", hf_dataset: str | None = None, hf_split: str = "train",
            hf_config: str | None = None, documents: Sequence[Document] | None = None,
            progress: bool = True) -> Path:
    """Tokenize ``inputs`` (files/directories), a Hugging Face dataset or ``documents`` into ``out_dir``.

    ``inputs`` is one path or a list of them. ``tokenizer`` is ``"dolma2"``, a path, or a :class:`Tokenizer`; ``bpe_vocab=N`` trains a byte-level
    BPE of N ids on the training documents instead. ``workers`` tokenizing processes; 1 tokenizes in
    this process with the tokenizers library's threads, which is faster below ~8 cores; the default
    is all cores from 8 cores up, else 1. Returns the output directory.
    """
    if isinstance(inputs, (str, os.PathLike)):  # one path, not a sequence of one-character names
        inputs = [inputs]
    if sum((bool(inputs), hf_dataset is not None, documents is not None)) != 1:
        raise DataError("give exactly one of: input files, a Hugging Face dataset, or a list of documents")
    if workers is not None and workers < 1:
        raise DataError(f"workers must be at least 1 (or None for the default), got {workers}")
    if bpe_vocab is not None:
        check_bpe_vocab(bpe_vocab)
    if workers is not None and workers > 4 * (os.cpu_count() or 1):
        raise DataError(f"workers={workers} is far more processes than this machine's {os.cpu_count()} cores")
    if hf_dataset is not None:
        source = HFDocuments(hf_dataset, hf_split, hf_config, text_field)
    elif documents is not None:
        source = ListDocuments(documents, {"kind": "documents", "count": len(documents)})
    else:
        source = FileDocuments(inputs, text_field)
    return _prepare(source, Path(out_dir), tokenizer, bpe_vocab, val_fraction, seed, workers, progress, {})


def default_cache_dir() -> Path:
    root = os.environ.get("OLMO_HYBRID_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "olmo_hybrid")
    return Path(root)


def prepare_bundled(out_dir: str | Path | None = None, bpe_vocab: int | None = 4096, val_fraction: float = 0.05,
                    seed: int = 0, workers: int = 1, progress: bool = False,
                    cache_dir: str | Path | None = None) -> Path:
    """The bundled Shakespeare corpus, tokenized once and cached; returns the dataset directory.

    ``bpe_vocab=None`` or 0 uses dolma2; ``seed`` picks the validation works. The default directory
    is ``<cache_dir>/data/shakespeare-<tokenizer>-val<f>-seed<s>`` with ``cache_dir`` defaulting to
    ``$OLMO_HYBRID_CACHE`` or ``~/.cache/olmo_hybrid``; a directory whose manifest records the same
    corpus and settings is reused as is.
    """
    tok_name = f"bpe{bpe_vocab}" if bpe_vocab else DOLMA2
    if out_dir is None:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        out_dir = root / "data" / f"shakespeare-{tok_name}-val{val_fraction:g}-seed{seed}"
    out_dir = Path(out_dir)
    key = {"corpus_sha256": hashlib.sha256(SHAKESPEARE_ASSET.read_bytes()).hexdigest(), "tokenizer": tok_name,
           "val_fraction": val_fraction, "seed": seed, "format_version": FORMAT_VERSION}
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file():
        try:
            if json.loads(manifest_path.read_text()).get("bundled") == key:
                return out_dir
        except (OSError, json.JSONDecodeError):
            pass  # unreadable: rebuild it
    source = ListDocuments(bundled_corpus(), {"kind": "bundled", "corpus": "shakespeare", "works": 42})
    bpe_vocab = bpe_vocab or None  # 0 means dolma2 here (data.bpe_vocab=0)
    return _prepare(source, out_dir, DOLMA2, bpe_vocab, val_fraction, seed, workers, progress, {"bundled": key})
