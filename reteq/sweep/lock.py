"""One sweep per work dir (a lock file naming its holder) and one per (tracking store, experiment) (a lease).

The lock is an exclusive `flock` on `<work dir>/sweep.lock`, which the kernel releases when the holder dies,
however it dies (SIGKILL included; NFS v4 carries flock as a lease that expires with its client); the file's
text says who holds it, for the refusal message. A lock whose holder died is taken over, and the new text
says from whom.

Two work dirs can record into one tracking store (a shared `execution.tracking_uri`): the work dir's lock
cannot see the other, and a second sweep would close the first's live runs as dead. So a sweep also holds a
lease recorded in the tracking store itself, on the experiment (`tracking.TAG_LEASE`): who holds it (work dir,
host, pid, attempt) and a heartbeat refreshed every HEARTBEAT_S. A sweep from another work dir is refused in
one line while the lease is live (a heartbeat younger than LEASE_TTL_S) and touches nothing; a lease whose
holder stopped beating is taken over. From the same work dir the flock above already proves the holder dead.
MLflow has no compare-and-set, so after writing its lease a sweep reads it back once more (a sweep that lost
a simultaneous race sees the other's and stops).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from reteq import tracking as T
from reteq.errors import BadInput
from reteq.redact import redact

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


LEASE_TTL_S = 120.0  # a lease without a heartbeat this long is a dead sweep's
HEARTBEAT_S = 30.0
RACE_SETTLE_S = 0.2  # between writing the lease and reading it back


class ExperimentBusy(BadInput):
    """A live sweep in another work dir records into the same experiment of the same store (exit 2)."""


class ExperimentLease:
    """The experiment's lease in the tracking store, held while this sweep runs (see the module docstring)."""

    def __init__(self, uri: str, experiment: str, work: Path, attempt: str, ttl: float = LEASE_TTL_S):
        self.uri, self.experiment, self.ttl = uri, experiment, ttl
        self.me = {"work_dir": str(Path(work).resolve()), "host": socket.gethostname(), "pid": os.getpid(),
                   "attempt": attempt}
        self._c = None
        self._exp_id = ""
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _held(self) -> dict:
        return _holder(self._c.get_experiment(self._exp_id).tags.get(T.TAG_LEASE, "") or "{}")

    def _write(self, **extra) -> None:
        self._c.set_experiment_tag(self._exp_id, T.TAG_LEASE, json.dumps({**self.me, "heartbeat": time.time(), **extra}))

    def acquire(self, c, exp_id: str) -> ExperimentLease:
        """Take the lease or raise ExperimentBusy; nothing else in the store is touched before this returns."""
        self._c, self._exp_id = c, exp_id
        self._refuse_if_live(self._held())
        self._write()
        time.sleep(RACE_SETTLE_S)
        held = self._held()
        if held.get("attempt") != self.me["attempt"]:  # another sweep wrote after us: it holds the lease
            self._refuse_if_live(held)
        self._beat = threading.Thread(target=self._heartbeat, name="reteq-lease", daemon=True)
        self._beat.start()
        return self

    def _refuse_if_live(self, held: dict) -> None:
        if not held or held.get("released") or held.get("attempt") == self.me["attempt"]:
            return
        if held.get("work_dir") == self.me["work_dir"]:
            return  # this process holds the work dir's flock: that holder is dead
        age = time.time() - float(held.get("heartbeat", 0))
        if age >= self.ttl:
            print(f"experiment '{self.experiment}': taking over the lease of a sweep in {held.get('work_dir')} "
                  f"(no heartbeat for {age:.0f}s)", flush=True)
            return
        raise ExperimentBusy(
            f"experiment '{self.experiment}' in {redact(self.uri)} is in use by a live sweep in "
            f"{held.get('work_dir', '?')} (pid {held.get('pid', '?')} on {held.get('host', '?')}, heartbeat "
            f"{age:.0f}s ago): one sweep per experiment and tracking store; rename the sweep or wait for it")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except Exception as e:  # noqa: BLE001 - a store hiccup: the next beat tries again
                print(f"experiment '{self.experiment}': lease heartbeat failed ({type(e).__name__})", flush=True)

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (when it is still ours)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
            try:
                if self._held().get("attempt") == self.me["attempt"]:
                    self._write(released=True)
            except Exception:  # noqa: BLE001 - the lease then expires after LEASE_TTL_S
                pass
