"""Atomic file writes: whatever a user had stays intact if a write is interrupted (crash, kill, full disk).

Failed writes become one ``WriteError`` that says what could not be written and why ("no space left on
device"), whichever library's error carried the operating system's (``failure_reason``).

Results files of long studies are JSON lines (``append_jsonl`` / ``read_jsonl``): a writer appends a whole line
under an exclusive ``flock`` with one ``write`` and an ``fsync``. A writer killed mid-line can still leave a
partial last line; readers drop it with a note, and the next append cuts it off first, so the file never holds a
broken line in the middle. A last line without its newline that holds a whole JSON object (a file edited by
hand, or a write cut just before its newline) is a record, not a torn one: readers keep it and the next append
ends it with a newline instead of cutting it (no proper prefix of a serialised object is itself one).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from olmo_hybrid.errors import WriteError

_REASONS = {errno.ENOSPC: "no space left on device (the disk is full)", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file too large for this file system or process limit",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
_RUST_OS_ERROR = re.compile(r"os error (\d+)")  # how safetensors (Rust) reports an OSError


def describe_errno(code: int) -> str:
    return _REASONS.get(code) or os.strerror(code).lower()


def failure_reason(exc: BaseException) -> str:
    """Why a write (or read) failed, in words: the operating system's error found anywhere in ``exc``'s chain.

    Libraries wrap it differently: ``torch.save`` raises a RuntimeError whose context is the OSError,
    Distributed Checkpoint collects ``(exception, traceback)`` pairs per rank in ``failures``, and
    safetensors only writes "(os error 28)" into its message. Falls back to the first line of ``exc``.
    """
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if isinstance(e, tuple):  # DCP: (exception, traceback summary)
            stack.extend(x for x in e[:1] if isinstance(x, BaseException))
            continue
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return describe_errno(e.errno)
        found = _RUST_OS_ERROR.search(str(e))
        if found:
            return describe_errno(int(found.group(1)))
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack.extend(failures.values())
        stack.extend([e.__cause__, e.__context__])
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def fsync_dir(path: str | Path) -> None:
    """Make a rename or new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (and ``root``), so a later rename publishes complete data."""
    root = Path(root)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fsync_dir(d)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text``: temp file in the same directory, fsync, rename, fsync the directory.

    On failure the temporary file is removed, ``path`` keeps its previous contents and a ``WriteError``
    names the file and the reason."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise WriteError(f"could not write {path}: {failure_reason(e)}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def default_permissions(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``mkdir`` or ``open`` would (0777 or 0666 less the umask): temporary
    directories are created private (0700) and safetensors writes 0600, which would leave an export or a dataset
    unreadable to the user's group once renamed into place."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def staging_dir(final: str | Path) -> Path:
    """A new empty directory beside ``final`` to build its replacement in (same file system, so
    ``install_dir`` can rename it into place)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    default_permissions(tmp)
    return tmp


def install_dir(tmp: str | Path, final: str | Path) -> None:
    """Move the finished directory ``tmp`` to ``final``. A previous ``final`` is moved aside first and
    deleted only once the new one is in place (put back if the swap fails), so at every instant ``final``
    is either the old directory or the new one, never a mix."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if not final.exists():
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.replace(final, old / "data")
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old / "data", final)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _whole_object(raw: bytes) -> dict | None:
    """``raw`` parsed when it is one complete JSON object, else None (a torn line)."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _cut_partial_tail(fd: int, log) -> None:
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    start = max(0, size - (1 << 20))
    tail = os.pread(fd, size - start, start)
    keep = start + tail.rfind(b"\n") + 1 if b"\n" in tail else start
    if keep > start or start == 0:  # the whole last line is in hand
        if _whole_object(os.pread(fd, size - keep, keep)) is not None:
            os.write(fd, b"\n")  # a complete record that lacked its newline: end it, keep it
            return
    log(f"note: dropping an incomplete last line ({size - keep} bytes, a writer was killed mid-line)")
    os.ftruncate(fd, keep)


def append_jsonl(path: str | Path, record: dict, log=print) -> None:
    """Append ``record`` as one JSON line: a killed writer leaves the line whole or absent (see the module doc)."""
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


def read_jsonl(path: str | Path, log=print, error: type[Exception] = ValueError) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every complete line of ``path`` (missing file: none). A partial last line is
    dropped with a note; any other unreadable line raises ``error`` naming it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    if lines[-1] and _whole_object(lines[-1]) is not None:
        lines.append(b"")  # a complete record without its newline: kept (see the module doc)
    elif lines[-1]:
        log(f"note: {path} line {len(lines)} is incomplete (a writer was killed mid-line); ignoring it")
    records = []
    for i, raw in enumerate(lines[:-1], start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise error(f"{path} line {i}: not valid JSON ({e})") from e
        if not isinstance(record, dict):
            raise error(f"{path} line {i}: expected a JSON object, got {type(record).__name__}")
        records.append((i, record))
    return records
