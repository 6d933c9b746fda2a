"""One sweep per work dir: a lock file naming its holder (host, pid, start time).

The lock is an exclusive `flock` on `<work dir>/sweep.lock`, which the kernel releases when the holder dies,
however it dies (SIGKILL included; NFS v4 carries flock as a lease that expires with its client); the file's
text says who holds it, for the refusal message. A lock whose holder died is taken over, and the new text
says from whom.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from reteq.errors import BadInput

LOCK_NAME = "sweep.lock"


class WorkDirBusy(BadInput):
    """Another live sweep holds the work dir (bad input: exit 2)."""


def _holder(text: str) -> dict:
    try:
        return json.loads(text)
    except ValueError:
        return {}


class WorkDirLock:
    def __init__(self, work: Path, what: str = "reteq sweep"):
        self.path = Path(work) / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> WorkDirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            raise WorkDirBusy(self._busy(held)) from None
        held = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": self.what}
        if held.get("pid") and not held.get("released"):  # its holder died without releasing it
            me["took_over_from"] = f"pid {held['pid']} on {held.get('host', '?')} since {held.get('start', '?')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _busy(self, held: dict) -> str:
        who = f"pid {held.get('pid', '?')} on {held.get('host', '?')} since {held.get('start', '?')}"
        return f"{self.path.parent}: work dir is in use by another {held.get('command', 'reteq sweep')} ({who})"

    def release(self) -> None:
        """Mark the file released and unlock; the file stays (unlinking it would race with a new holder)."""
        if self._fd is None:
            return
        try:
            held = _holder(os.pread(self._fd, 4096, 0).decode(errors="replace"))
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps({**held, "released": True}).encode(), 0)
        except OSError:
            pass  # a full or read-only disk: the kernel lock still goes away below
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
