"""The ladder's results file: one JSON object per line, one line per (architecture, size, seed, budget) point.

Writers append a whole line under an exclusive ``flock`` with one ``write`` and an ``fsync``. A writer killed
mid-line can still leave a partial last line; readers drop it with a note, and the next append cuts it off
first, so the file never holds a broken line in the middle.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from olmo_hybrid.errors import DataError
from olmo_hybrid.fsio import fsync_dir

REQUIRED = ("arch", "pattern", "params_nonemb", "tokens", "loss", "budget", "seed")


class ResultsError(DataError):
    """A results file or one of its lines is unusable (the message names the file and line)."""


@dataclass
class Point:
    line: int  # 1-based line number in the file
    record: dict


def _cut_partial_tail(fd: int, log) -> None:
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    start = max(0, size - (1 << 20))
    tail = os.pread(fd, size - start, start)
    keep = start + tail.rfind(b"\n") + 1 if b"\n" in tail else start
    log(f"note: dropping an incomplete last line ({size - keep} bytes, a writer was killed mid-line)")
    os.ftruncate(fd, keep)


def append_result(path: str | Path, record: dict, log=print) -> None:
    """Append ``record`` as one line: a killed writer leaves the line whole or absent (see the module doc)."""
    path = Path(path)
    line = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
    existed = path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _cut_partial_tail(fd, log)
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock
    if not existed:
        fsync_dir(path.parent)


def read_results(path: str | Path, log=print) -> list[Point]:
    """Every complete line of ``path`` (missing file: none). A partial last line is dropped with a note; any
    other unreadable line is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1]:
        log(f"note: {path} line {len(lines)} is incomplete (a writer was killed mid-line); ignoring it")
    points = []
    for i, raw in enumerate(lines[:-1], start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ResultsError(f"{path} line {i}: not valid JSON ({e})") from e
        if not isinstance(record, dict):
            raise ResultsError(f"{path} line {i}: expected a JSON object, got {type(record).__name__}")
        points.append(Point(i, record))
    return points


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
