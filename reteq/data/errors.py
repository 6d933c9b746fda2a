"""The data layer's error type, in a module of its own so torch-only code paths (bench/) need no pydantic."""


class DataError(ValueError):
    """A data file or row that cannot be used; the message is one line naming file and field."""
