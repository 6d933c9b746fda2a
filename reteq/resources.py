"""Resource errors (disk full, read-only or forbidden work dir) as one line: the path and what was being written.

They surface as an OSError in the driver, as SQLite's own words through SQLAlchemy/MLflow, or as the text of
a failed Ray trial; `describe` recognises all three. `writing(what, path)` names the write in progress, so the
line can say "while writing the MLflow store" rather than only where.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


class ResourceError(RuntimeError):
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
