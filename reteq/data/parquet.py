"""Parquet data files, read and written with pyarrow: the one module of reteq.data that imports it, so the
rest of the data layer (and every process that only plans) loads no pyarrow until a Parquet file is touched;
reteq.data.sources and reteq.data.prepare import this module inside the function that needs it."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from reteq.errors import DataError


def conversations_table(conversations: list[dict]) -> pa.Table:
    """A `messages` column (list<struct<role: string, content: string>>) and a nullable `group` string column
    (the stratum of eval samples)."""
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.table({"messages": pa.array([c["messages"] for c in conversations], type=pa.list_(message)),
                     "group": pa.array([c.get("group") for c in conversations], type=pa.string())})


def write_table(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path)


def read_rows(path: Path) -> list[dict]:
    """The rows of a Parquet data file; an unreadable file or row is one line naming it."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file, truncated or corrupt "
                        f"({str(e).splitlines()[0]})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: row 0: the Parquet file has no rows")
    try:
        return table.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException):
        pass
    for i in range(table.num_rows):  # find the row that does not decode
        try:
            table.slice(i, 1).to_pylist()
        except (UnicodeDecodeError, pa.ArrowException) as e:
            raise DataError(f"{path}: row {i}: unreadable ({str(e).splitlines()[0]})") from None
    raise DataError(f"{path}: unreadable Parquet rows")
