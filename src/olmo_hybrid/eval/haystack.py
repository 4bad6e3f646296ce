"""Text sources for long-context evaluation: haystack prose, word pools, and token counting.

RULER's essay haystack (Paul Graham essays) and its word lists (``wonderwords``) cannot ship with the
project, so the generators here draw both from public-domain prose: by default the Shakespeare corpus
bundled by ``olmo_hybrid.data``, or any UTF-8 text / ``.xz`` file (for example a Gutenberg
split). Every result file records which source was used (``HaystackText.description``).
"""

from __future__ import annotations

import lzma
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# RULER's "noise" haystack line, repeated.
NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# Enough prose for 128k-token haystacks; RULER cycles the essay text when it is shorter than needed.
DEFAULT_MAX_CHARS = 4_000_000


class Tokenizer(Protocol):
    def encode(self, text: str): ...


def token_counter(tokenizer) -> Callable[[str], int]:
    """``len(encode(text))`` for our tokenizer wrapper (list of ids) or a raw ``tokenizers.Tokenizer``."""
    if not hasattr(tokenizer, "encode"):
        raise TypeError(f"tokenizer must have an encode(text) method, got {type(tokenizer).__name__}")

    def count(text: str) -> int:
        out = tokenizer.encode(text)
        return len(getattr(out, "ids", out))

    return count


def encode_ids(tokenizer, text: str) -> list[int]:
    out = tokenizer.encode(text)
    return list(getattr(out, "ids", out))


@dataclass
class HaystackText:
    text: str
    description: str
    _pools: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def words(self) -> list[str]:
        return self.text.split()

    def word_pool(self, min_len: int = 3, max_len: int = 12) -> list[str]:
        """Distinct lowercase alphabetic words of the text, sorted (deterministic across runs); a new list each call
        (computed once per text: a pass over megabytes of prose)."""
        if (min_len, max_len) not in self._pools:
            # whole words only: no fragments of elisions such as "sympathiz'd"
            found = set(re.findall(rf"(?<![\w'-])[a-z]{{{min_len},{max_len}}}(?![\w'-])", self.text))
            self._pools[min_len, max_len] = sorted(found)
        return list(self._pools[min_len, max_len])


def read_text_file(path: str | Path, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise FileNotFoundError(f"haystack file {p} {what} (expected a UTF-8 .txt or .xz file)")
    opener = lzma.open if p.suffix == ".xz" else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            text = f.read(max_chars)
    except UnicodeDecodeError as e:
        raise ValueError(f"haystack file {p} is not UTF-8 text ({e.reason})") from e
    except (lzma.LZMAError, EOFError) as e:  # not xz data, or cut short
        raise ValueError(f"haystack file {p} is not a readable .xz file ({e})") from e
    # Gutenberg splits separate books with this marker; it is not prose.
    return text.replace("<|endoftext|>", "\n")


def load_haystack(source: str = "bundled", max_chars: int = DEFAULT_MAX_CHARS) -> HaystackText:
    """``"bundled"``: the Shakespeare corpus shipped with the project; otherwise a path to a text file."""
    if source == "bundled":
        from olmo_hybrid.data.corpus import bundled_corpus

        text = "\n".join(doc.text for doc in bundled_corpus())
        return HaystackText(
            text[:max_chars],
            "bundled public-domain Shakespeare corpus (substitute for RULER's Paul Graham essays)",
        )
    text = read_text_file(source, max_chars)
    if len(text.split()) < 1000:
        raise ValueError(f"haystack file {source} has fewer than 1000 words; need more prose to build haystacks")
    return HaystackText(text, f"public-domain prose from {Path(source).name} (substitute for RULER's essays)")


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'A-Z0-9(\[])")


def split_sentences(text: str) -> list[str]:
    """A dependency-free sentence splitter (RULER uses nltk's punkt); boundaries only place needles."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def take_words_by_line(line_at: Callable[[int], str], n_words: int) -> list[str]:
    """The first ``n_words`` words of the line stream ``line_at(0), line_at(1), ...``, keeping lines.

    The last line may be cut short: it gives word-level control of the haystack size, which is what
    keeps a sample within 1% of the requested token length even when one line is many tokens long.
    """
    lines, left, i = [], n_words, 0
    while left > 0:
        words = line_at(i).split()
        if len(words) > left:
            words = words[:left]
        lines.append(" ".join(words))
        left -= len(words)
        i += 1
    return lines
