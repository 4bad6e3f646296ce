"""The ladder's results file: one JSON object per line, one line per (architecture, size, seed, budget) point.

Lines are appended and read with ``olmo_hybrid.fsio.append_jsonl`` / ``read_jsonl``: a writer killed mid-line
leaves at most a partial last line, which readers drop with a note and the next append cuts off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from olmo_hybrid.errors import DataError
from olmo_hybrid.fsio import append_jsonl, read_jsonl

REQUIRED = ("arch", "pattern", "params_nonemb", "tokens", "loss", "budget", "seed")


class ResultsError(DataError):
    """A results file or one of its lines is unusable (the message names the file and line)."""


@dataclass
class Point:
    line: int  # 1-based line number in the file
    record: dict


def append_result(path: str | Path, record: dict, log=print) -> None:
    """Append ``record`` as one line: a killed writer leaves the line whole or absent (see the module doc)."""
    append_jsonl(path, record, log=log)


def read_results(path: str | Path, log=print) -> list[Point]:
    """Every complete line of ``path`` (missing file: none). A partial last line is dropped with a note; any
    other unreadable line is an error naming it."""
    return [Point(i, record) for i, record in read_jsonl(path, log=log, error=ResultsError)]


def check_point(path: str | Path, point: Point) -> None:
    """The fields a fit needs are present and sane; the error names the line and field."""
    r, where = point.record, f"{path} line {point.line}"
    missing = [k for k in REQUIRED if k not in r]
    if missing:
        raise ResultsError(f"{where}: missing field(s) {', '.join(missing)} (a point needs {', '.join(REQUIRED)})")
    if not isinstance(r["arch"], str) or not r["arch"]:
        raise ResultsError(f"{where}: 'arch' must be a non-empty string, got {r['arch']!r}")
    if isinstance(r["seed"], bool) or not isinstance(r["seed"], int):
        raise ResultsError(f"{where}: 'seed' must be an integer, got {r['seed']!r}")
    for key in ("loss", "params_nonemb", "tokens"):
        v = r[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ResultsError(f"{where}: '{key}' must be a finite number, got {v!r}")
        if v <= 0:
            raise ResultsError(f"{where}: '{key}' must be positive, got {v!r}")


# What a point's loss was measured on: points that differ here are not comparable (other nats per token).
MEASUREMENT = {"tokenizer": ("data", "tokenizer_sha256"), "validation tokens": ("data", "val_tokens"),
               "seq_len": ("seq_len",)}


def _measurement(record: dict) -> dict:
    found = {}
    for name, keys in MEASUREMENT.items():
        value = record
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            found[name] = value
    return found


def unique_points(path: str | Path, points: list[Point], log=print) -> list[Point]:
    """The points with repeats removed, after checking that they can be fitted together.

    A point is (arch, params_nonemb, tokens, seed). A line repeating an earlier one with the same loss (a
    results file concatenated twice, a resume on two machines) is counted once, with a warning: counted twice
    it would weigh double in the fit. The same point with another loss is an error naming both lines. Points
    measured on another tokenizer, validation split or sequence length than the first line (where the records
    say) are an error: their losses are not on one scale."""
    first: dict[tuple, Point] = {}
    reference: Point | None = None
    kept = []
    for p in points:
        r = p.record
        measured = _measurement(r)
        if reference is None and measured:
            reference = p
        elif measured:
            ref = _measurement(reference.record)
            differ = [f"{k} {ref[k]!r} vs {v!r}" for k, v in measured.items() if k in ref and ref[k] != v]
            if differ:
                raise ResultsError(f"{path} line {p.line}: measured on another held-out set than line {reference.line} "
                                   f"({'; '.join(differ)}): losses on different tokenizers, validation splits or "
                                   "sequence lengths cannot be fitted together")
        key = (r["arch"], float(r["params_nonemb"]), float(r["tokens"]), r["seed"])
        if key not in first:
            first[key] = p
            kept.append(p)
            continue
        earlier = first[key]
        what = f"{r['arch']} at {key[1]:g} parameters, {key[2]:g} tokens, seed {r['seed']}"
        if earlier.record["loss"] != r["loss"]:
            raise ResultsError(f"{path} lines {earlier.line} and {p.line}: the same point ({what}) with different "
                               f"losses {earlier.record['loss']!r} and {r['loss']!r}; remove the wrong line")
        log(f"warning: {path} line {p.line} repeats line {earlier.line} ({what}); counted once")
    return kept
