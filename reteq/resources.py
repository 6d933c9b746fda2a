"""Resource errors (disk full, read-only or forbidden work dir) as one line: the path and what was being written.

They surface as an OSError in the driver, as SQLite's own words through SQLAlchemy/MLflow, or as the text of
a failed Ray trial; `describe` recognises all three. `writing(what, path)` names the write in progress, so the
line can say "while writing the MLflow store" rather than only where.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from reteq.errors import ReteqError
from reteq.redact import redact

_PROBLEMS = (  # (text in an error message, what it means)
    ("No space left on device", "disk full"),
    ("database or disk is full", "disk full"),
    ("Disk quota exceeded", "disk quota exceeded"),
    ("Read-only file system", "read-only file system"),
    ("attempt to write a readonly database", "read-only file system"),
    ("Permission denied", "permission denied"),
)
_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied"}
_WHAT = (  # (part of a path, what a write there is)
    ("checkpoints", "a stage checkpoint"), ("mlartifacts", "an MLflow artifact"), ("mlflow.db", "the MLflow store"),
    ("sweep.lock", "the work dir lock"), ("report", "the report"), ("/ray/", "Ray Tune's trial state"),
)


class ResourceError(ReteqError, RuntimeError):
    """One line for the user; the run's record is closed as FAILED before it is raised."""

    resource_error = True


def describe(error: BaseException | str, path: str | Path | None = None, what: str | None = None) -> str | None:
    """`PATH: PROBLEM while writing WHAT`, or None when `error` is not a resource error."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    problem = _ERRNOS.get(getattr(error, "errno", None) or -1)
    problem = problem or next((p for needle, p in _PROBLEMS if needle in text), None)
    if problem is None:
        return None
    where = getattr(error, "filename", None) or path
    if where is None:
        found = re.findall(r"'(/[^']+)'", text)
        where = found[-1] if found else "?"
    what = what or next((w for part, w in _WHAT if part in str(where)), "a file")
    return f"{where}: {problem} while writing {what}"


def full_disk(path: str | Path, least_bytes: int = 1 << 20) -> str | None:
    """`PATH: disk full while writing the work dir` when the file system holding `path` has less than
    `least_bytes` left, else None. For errors a library raised about a file it could not finish (Ray Tune reads
    its own truncated experiment state back as a JSON-decode error): the cause is the disk, not the JSON."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return f"{path}: disk full while writing the work dir" if st.f_bavail * st.f_frsize < least_bytes else None


# lines a wrapped database error appends after its cause: SQLAlchemy's statement, parameters and footer
_NOISE = re.compile(r"^\s*(\[SQL: |\[parameters: |\(Background on this error at: )")


def one_line(error: BaseException) -> str:
    """An exception as one line for the console and a failed node's record: `PATH: PROBLEM while writing WHAT`
    for a resource error that names its path, else `Type: first line`, where the first line is the cause
    (`(sqlite3.OperationalError) database or disk is full`), never SQLAlchemy's footer after it."""
    problem = describe(error)
    if problem is not None and not problem.startswith("?:"):
        return problem
    lines = [x.strip() for x in redact(str(error)).splitlines() if x.strip() and not _NOISE.match(x)]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` into a temp file beside `path`, then one rename over it: a reader, or a disk that fills midway,
    sees the old file or the new one, never half of one, and no temp file is left behind either way."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def writing(what: str, path: str | Path) -> Iterator[None]:
    """Turn a resource error raised inside the block into a ResourceError naming `what` and `path`."""
    try:
        yield
    except ResourceError:
        raise
    except Exception as e:
        line = describe(e, path, what)
        if line is None:
            raise
        raise ResourceError(line) from e
