"""One error root and bad input.

`ReteqError` is the root of every exception reteq raises on purpose, so a caller (a notebook, a script driving
reteq, a test) can catch all of them with one `except ReteqError` and let anything else (a bug) keep its
traceback. `BadInput` below it is everything a user can fix by changing a config, a data file or a model path.

The `reteq` command catches `BadInput` (and nothing narrower), prints one line per problem and exits 2; any
other exception is a bug and keeps its traceback. Subclasses exist only where a caller must tell them apart.
This module imports only reteq.redact (stdlib `re`), so every layer (bench/ included) can raise these without pulling in pydantic.
"""

from __future__ import annotations

from reteq.redact import redact

MAX_LINE = 400  # characters of one error line: a hostile value is named, never printed whole


def _line(text: str) -> str:
    text = redact(str(text).replace("\n", " "))
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."


class ReteqError(Exception):
    """Root of every exception reteq raises on purpose: one `except ReteqError` catches them all. Subclasses
    keep a second standard base (RuntimeError, ValueError) where callers rely on it."""


class BadInput(ReteqError):
    """Input that cannot be used. `lines` holds one `file: field: reason` line per problem (at most MAX_LINE
    characters each)."""

    def __init__(self, message: str = "", lines: list[str] | None = None):
        self.lines = [_line(x) for x in lines] if lines is not None else [_line(" ".join(str(message).split()))]
        super().__init__("\n".join(self.lines))


class ConfigError(BadInput):
    """One or more problems with a config file (one line each)."""

    def __init__(self, lines: list[str]):
        super().__init__(lines=lines)


class DataError(BadInput):
    """A data file or row that cannot be used; names file and field."""


class MalformedRowError(DataError):
    """A source row that cannot be converted. Names the dataset and the row index."""

    def __init__(self, dataset_id: str, index: int, reason: str):
        self.dataset_id, self.index, self.reason = dataset_id, index, reason
        super().__init__(f"{dataset_id}: row {index}: {reason}")


class HubDataError(DataError):
    """A hub dataset that cannot be loaded (gated, missing, offline) or has the wrong shape."""


class PrepareError(BadInput):
    """A stage that could not be prepared: `field` is its place in the config, `reason` one line."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, " ".join(str(reason).split())
        super().__init__(f"{field}: {self.reason}")


class ModelError(BadInput):
    """A model that cannot be loaded; names the model and why."""


class CheckpointError(BadInput):
    """A checkpoint that is partial, foreign or corrupt (sha256 mismatch)."""


class NodeFailed(ReteqError, RuntimeError):
    """A stage node (or a retrain record) of a sweep could not be done; `key` names it, and the leaves below it
    report it (reteq.sweep.dag reads the key from the error Ray stores in the node's ref)."""

    def __init__(self, key: str, message: str):
        super().__init__(key, message)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return self.message
