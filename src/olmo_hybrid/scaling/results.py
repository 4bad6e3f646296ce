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
    for key in ("loss", "params_nonemb", "tokens"):
        v = r[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ResultsError(f"{where}: '{key}' must be a finite number, got {v!r}")
        if v <= 0:
            raise ResultsError(f"{where}: '{key}' must be positive, got {v!r}")
