"""The run lock: one trainer at a time writes a run directory.

``RUN/.lock`` holds the holder's pid, host and start time, and the holder keeps an exclusive ``flock`` on
it. The kernel drops that lock when the process ends, however it ends, so a lock file left by a killed
trainer is recognised as stale and taken over (with a note) while a live holder is named in the refusal.
On file systems without ``flock`` support the pid is checked instead (possible only on the same host: a
holder on another host is trusted to be alive). The file stays after release, empty.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from olmo_hybrid.checkpoint.run_dir import LOCK
from olmo_hybrid.errors import CheckpointError

_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory's lock (``acquire()`` / ``release()`` also work).

    ``acquire`` raises ``CheckpointError`` naming the holder's pid and host when another live process holds it.
    """

    def __init__(self, run_dir: str | Path, log=print):
        self.path = Path(run_dir) / LOCK
        self.log = log
        self._fd: int | None = None

    def _holder(self, fd: int) -> dict | None:
        raw = os.pread(fd, 4096, 0)
        if not raw.strip():
            return None
        try:
            holder = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {"pid": "?", "host": "?", "started": "?"}
        return holder if isinstance(holder, dict) else {"pid": "?", "host": "?", "started": "?"}

    def _refuse(self, holder: dict) -> CheckpointError:
        return CheckpointError(
            f"{self.path.parent} is in use by another training process (pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')}, started {holder.get('started', '?')}): wait for it to finish or stop it, "
            f"or choose another --out directory (if that process is gone, delete {self.path})")

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._refuse(self._holder(fd) or {}) from None
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise
                holder = self._holder(fd)
                pid = holder.get("pid") if holder else None
                if holder and (holder.get("host") != socket.gethostname() or not isinstance(pid, int)
                               or _pid_alive(pid)):
                    raise self._refuse(holder) from None
            holder = self._holder(fd)
            if holder:
                self.log(f"note: {self.path} names pid {holder.get('pid')} on {holder.get('host')}, which no longer "
                         "holds it (killed?): taking the run directory over")
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
