"""Post-training examples: read conversations and preference pairs, check them, and tokenize them with the
chat template (``olmo_hybrid.data.chat``) into token ids plus the mask of tokens that are trained.

Assistant text is what the template marks with ``{% generation %}`` (ours marks each reply and the
``<|im_end|>\\n`` that closes it), as transformers' ``return_assistant_tokens_mask`` reports it. A template
without the tag: for assistant message ``i`` the span runs from the end of
``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i + 1])``, i.e. the
message's content and whatever closes its turn. That needs a template whose rendering of a prefix of the
conversation is a prefix of the whole rendering; a template that is not (one that closes the last turn
differently, say) is refused by name. Either way a token is trained when it overlaps the assistant text
(transformers' rule).

Inputs are JSONL files (one JSON object per line) or, when the ``datasets`` package is installed, a
Hugging Face dataset (a saved directory or a hub name). Every error names the example: ``FILE line N`` or
``DATASET row N`` (1-based).

* SFT: ``{"messages": [{"role": ..., "content": ...}, ...]}``; at least one assistant turn; roles from
  ``olmo_hybrid.data.chat.ROLES``. Every assistant turn is trained.
* DPO: ``{"prompt" | "messages", "chosen", "rejected"}``. The prompt is a string (one user turn) or a message
  list; ``chosen`` / ``rejected`` are a string (one assistant turn), a message, or a message list (which may
  repeat the prompt first, as many hub datasets do). Without a prompt, ``chosen`` and ``rejected`` are two
  whole conversations and their common first messages are the prompt. Only the response is scored.

Too long (``truncation``): ``truncate`` cuts the end and reports how many were cut (an example left with no
trained token is dropped and counted); ``drop`` skips and counts; ``error`` refuses, naming the example.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from olmo_hybrid.data.chat import ChatTemplate, check_messages
from olmo_hybrid.data.corpus import first_undecodable, json_object
from olmo_hybrid.errors import DataError

TRUNCATION = ("truncate", "drop", "error")


@dataclass
class Sequence:
    """One tokenized sequence: ``ids`` and, per token, whether predicting it is trained (``scored``);
    ``n_bytes``: UTF-8 bytes of the scored text (for bits per byte)."""

    ids: np.ndarray
    scored: np.ndarray
    n_bytes: int


@dataclass
class Report:
    """What tokenization did to a file's examples."""

    kept: int = 0
    truncated: list[str] = field(default_factory=list)  # where
    dropped: list[str] = field(default_factory=list)

    def describe(self, what: str, limit: int) -> str:
        text = f"{self.kept:,} {what}"
        for name, items in (("truncated", self.truncated), ("dropped", self.dropped)):
            if items:
                text += f"; {len(items):,} {name} (longer than {limit} tokens; first: {items[0]})"
        return text


def check_source(source: str) -> None:
    """A source that names a local path (absolute, relative with a ``./``, deeper than a hub ``owner/name``, or
    ending in ``.json`` / ``.jsonl``) must exist: a typo is reported before anything is loaded, not sent to the
    hub as a dataset name."""
    path = Path(source)
    local = path.is_absolute() or source.startswith(".") or source.count("/") > 1 or path.suffix in (".json", ".jsonl")
    if local and not path.exists():
        raise DataError(f"{source} does not exist (expected a JSONL file, a datasets directory saved with "
                        "save_to_disk, or a hub dataset name)")


def read_records(source: str, split: str = "train") -> Iterator[tuple[str, dict]]:
    """``(where, record)`` for every example of a JSONL file or a ``datasets`` dataset."""
    check_source(source)
    path = Path(source)
    if path.is_file():
        try:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path.name} line {n}"
                    yield where, json_object(line, where)
        except UnicodeDecodeError as e:
            line, offset = first_undecodable(path)
            raise DataError(f"{path.name} line {line} is not UTF-8 text (byte {offset}: {e.reason})") from e
        return
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{source} is not a file; reading a Hugging Face dataset needs the datasets package "
                        "(pip install datasets)") from e
    if path.is_dir():
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise DataError(f"{source} has no split {split!r} (splits: {', '.join(data)})")
            data = data[split]
    else:
        try:
            data = datasets.load_dataset(source, split=split)
        except Exception as e:  # datasets raises many types (not found, no network, bad split)
            raise DataError(f"{source} is not a file, and loading it as a datasets dataset failed: {e}") from e
    for n, record in enumerate(data, 1):
        yield f"{path.name} row {n}", dict(record)


def assistant_spans(chat: ChatTemplate, messages: list[dict], first: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """``(text, [(start, end), ...])``: the rendering and the character spans of the assistant text from message
    ``first`` on: the template's ``{% generation %}`` blocks when it has them, else each assistant turn found by
    rendering prefixes of the conversation."""
    if chat.marks_generation:
        text, spans = chat.render_with_spans(messages)
        if first:  # the response's blocks: those after as many as the messages before it render alone
            spans = spans[len(chat.render_with_spans(messages[:first])[1]):]
        return text, spans
    text = chat.render(messages)
    spans = []
    for i, message in enumerate(messages):
        if i < first or message["role"] != "assistant":
            continue
        before = chat.render(messages[:i], add_generation_prompt=True)
        through = chat.render(messages[:i + 1])
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise DataError(PREFIX_ERROR)
        spans.append((len(before), len(through)))
    return text, spans


PREFIX_ERROR = ("the chat template renders a conversation's first messages differently from the start of the whole "
                "conversation, so assistant tokens cannot be located; use a template whose turns do not depend on "
                "what follows them, or one that marks assistant text with {% generation %}")


def token_mask(offsets, spans: list[tuple[int, int]]) -> list[bool]:
    """Per token (character ``offsets``), whether it overlaps one of the sorted ``spans``: transformers' rule for
    ``return_assistant_tokens_mask``, so a token that straddles a span's edge is trained."""
    mask, j = [], 0
    for start, end in offsets:
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        mask.append(j < len(spans) and end > spans[j][0])
    return mask


def encode_with_mask(chat: ChatTemplate, messages: list[dict], first: int = 0) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and, per token, whether it is assistant text from message ``first`` on
    (``token_mask`` of ``assistant_spans``)."""
    text, spans = assistant_spans(chat, messages, first)
    enc = chat.tokenize(text)
    return enc.ids, token_mask(enc.offsets, spans)


def _has_assistant(messages: list[dict]) -> bool:
    return any(m["role"] == "assistant" for m in messages)


def _sequence(chat: ChatTemplate, messages: list[dict], where: str, first_scored: int = 0) -> Sequence:
    ids, scored = encode_with_mask(chat, messages, first_scored)
    ids, scored = np.asarray(ids, dtype=np.int64), np.asarray(scored, dtype=bool)
    seq = Sequence(ids, scored, _scored_bytes(chat, ids, scored))
    if not _trains(seq):
        raise DataError(f"{where}: the chat template marks no assistant token to train on in this conversation")
    return seq


def _scored_bytes(chat: ChatTemplate, ids: np.ndarray, scored: np.ndarray) -> int:
    """UTF-8 bytes of the scored text, decoded run by run (a run is one assistant turn)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], scored.astype(np.int8), [0]])))
    return sum(len(chat.tokenizer.decode(ids[a:b].tolist()).encode("utf-8")) for a, b in zip(edges[::2], edges[1::2]))


def _cut(seq: Sequence, n: int, chat: ChatTemplate) -> Sequence:
    ids, scored = seq.ids[:n], seq.scored[:n]
    return Sequence(ids, scored, _scored_bytes(chat, ids, scored))


def _over_limit(n: int, limit: int, where: str, truncation: str, report: Report, what: str) -> bool:
    """Whether an example of ``n`` tokens is kept (True: cut it to the limit if longer); False: skip it."""
    if n <= limit:
        return True
    if truncation == "error":
        raise DataError(f"{where}: the {what} has {n} tokens, more than the limit of {limit} "
                        "(data.truncation=error; truncate or drop it instead, or raise data.seq_len)")
    if truncation == "drop":
        report.dropped.append(where)
        return False
    report.truncated.append(where)
    return True


def _trains(seq: Sequence) -> bool:
    return bool(seq.scored[1:].any())  # the first token is never a label


def tokenize_conversations(records, chat: ChatTemplate, limit: int, truncation: str) -> tuple[list[Sequence], Report]:
    """SFT sequences of at most ``limit`` tokens from ``(where, record)`` pairs."""
    report, out = Report(), []
    for where, record in records:
        messages = check_messages(record.get("messages"), where)
        if not _has_assistant(messages):
            raise DataError(f"{where}: the conversation has no assistant turn, so it has nothing to train on")
        seq = _sequence(chat, messages, where)
        if not _over_limit(len(seq.ids), limit, where, truncation, report, "conversation"):
            continue
        if len(seq.ids) > limit:
            seq = _cut(seq, limit, chat)
            if not _trains(seq):
                report.dropped.append(where)
                continue
        out.append(seq)
    report.kept = len(out)
    return out, report


def _as_messages(value, where: str, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    return check_messages(value, where, what)


def split_pair(record: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """``(prompt, chosen response, rejected response)`` message lists of one preference record."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(f"{where}: missing '{key}' (a pair needs 'prompt' or 'messages', 'chosen' and 'rejected')")
    chosen = _as_messages(record["chosen"], where, "chosen")
    rejected = _as_messages(record["rejected"], where, "rejected")
    if "prompt" in record or "messages" in record:
        key = "prompt" if "prompt" in record else "messages"
        prompt = record[key]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(prompt, where, key)
        # Hub datasets often repeat the prompt at the start of chosen and rejected (each checked on its own:
        # a response that repeats it while the other does not would otherwise score the prompt twice).
        chosen, rejected = (r[len(prompt):] if r[:len(prompt)] == prompt else r for r in (chosen, rejected))
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise DataError(f"{where}: without 'prompt' or 'messages', 'chosen' and 'rejected' must be conversations "
                            "that start with the same prompt messages")
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical, so the pair expresses no preference")
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response or response[-1]["role"] != "assistant":
            raise DataError(f"{where}: the '{name}' response must end with an assistant turn")
    return prompt, chosen, rejected


@dataclass
class Pair:
    chosen: Sequence
    rejected: Sequence


def tokenize_pairs(records, chat: ChatTemplate, limit: int, truncation: str) -> tuple[list[Pair], Report]:
    """DPO pairs whose chosen and rejected sequences (prompt included) fit ``limit`` tokens together."""
    report, out = Report(), []
    for where, record in records:
        prompt, chosen, rejected = split_pair(record, where)
        c, r = (_sequence(chat, prompt + resp, where, len(prompt)) for resp in (chosen, rejected))
        total = len(c.ids) + len(r.ids)
        if not _over_limit(total, limit, where, truncation, report, "pair (chosen + rejected)"):
            continue
        if total > limit:
            # Cut the longer sequence first; both to half when both are longer than half.
            short = min(len(c.ids), len(r.ids))
            cap_long = max(limit - short, limit - limit // 2)
            caps = (cap_long, limit - cap_long) if len(c.ids) >= len(r.ids) else (limit - cap_long, cap_long)
            c, r = _cut(c, min(len(c.ids), caps[0]), chat), _cut(r, min(len(r.ids), caps[1]), chat)
            if not (_trains(c) and _trains(r)):
                report.dropped.append(where)
                continue
        out.append(Pair(c, r))
    report.kept = len(out)
    return out, report
