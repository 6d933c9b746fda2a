"""Stage data from a synthetic generator, a local file, or the hub, always as validated chat conversations.

A conversation is `{"messages": [{"role": ..., "content": ...}, ...]}` with at least one assistant turn.
A bad row is an error naming the file and the row index, never silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reteq.config import DataSource
from reteq.data import synthetic
from reteq.data.gsm8k import extract_answer, load_gsm8k_test
from reteq.data.hub import load_hub
from reteq.data.rcu import stage_datasets
from reteq.errors import DataError

ROLES = ("system", "user", "assistant")


def validate_conversation(row: Any, origin: str, index: int) -> dict:
    where = f"{origin}: row {index}"
    if not isinstance(row, dict) or "messages" not in row:
        raise DataError(f"{where}: no 'messages' field")
    messages = row["messages"]
    if hasattr(messages, "tolist"):  # numpy arrays from parquet
        messages = messages.tolist()
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    clean = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{j}] needs role in {ROLES} and string content")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: messages[{j}].content: empty assistant turn")
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise DataError(f"{where}: no assistant turn")
    group = row.get("group")  # optional stratum for eval samples (category, author)
    return {"messages": clean, "group": group} if isinstance(group, str) and group else {"messages": clean}


def read_local(path: str | Path) -> list[dict]:
    """Rows of a .json (list), .jsonl or .parquet file, validated."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: data file does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for i, line in enumerate(_utf8_lines(path)):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: row {i}: not valid JSON ({e.msg})") from None
        elif suffix == ".json":
            rows = json.loads("\n".join(_utf8_lines(path)))
            if not isinstance(rows, list):
                raise DataError(f"{path}: a .json data file must hold a list of rows")
        elif suffix == ".parquet":
            # lazy: pyarrow only when Parquet is read or written (reteq.data.parquet imports it)
            from reteq.data import parquet

            rows = parquet.read_rows(path)
        else:
            raise DataError(f"{path}: unsupported data file type {suffix!r} (use .json, .jsonl or .parquet)")
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg})") from None
    return [validate_conversation(r, str(path), i) for i, r in enumerate(rows)]


def _utf8_lines(path: Path) -> list[str]:
    """The file's lines; invalid UTF-8 is an error naming the line (a .jsonl row) and the byte."""
    out = []
    for i, raw in enumerate(path.read_bytes().split(b"\n")):
        try:
            out.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: row {i}: invalid UTF-8 at byte {e.start} of the line") from None
    return out


def load_conversations(source: DataSource) -> list[dict]:
    """The conversations a stage trains on, truncated to `source.n` rows when given."""
    if source.kind == "synthetic" and (source.task or "").startswith("rcu_"):
        rows = stage_datasets()[(source.task or "")[4:]]
    elif source.kind == "synthetic":
        rows = synthetic.generate(source.task or "", source.n or 64, source.seed)
    elif source.kind == "local":
        rows = read_local(source.path or "")
    else:
        rows = [validate_conversation(r, source.id or "hub", i) for i, r in enumerate(load_hub(source))]
    if source.n is not None:
        rows = rows[: source.n]
    if not rows:
        raise DataError(f"{source.path or source.id or source.task}: no rows")
    return rows


def load_math_eval(source: DataSource | None, n: int) -> list[tuple[str, str]]:
    """(question, reference number) pairs for math accuracy; synthetic unless a hub/local source is given."""
    if source is None or source.kind == "synthetic":
        return synthetic.math_eval(n, source.seed if source else 0)
    if source.kind == "hub":
        return load_gsm8k_test(source)[:n]

    out = []
    for conv in read_local(source.path or "")[:n]:
        user = next(m["content"] for m in conv["messages"] if m["role"] == "user")
        answer = conv["messages"][-1]["content"]
        out.append((user, extract_answer(answer) or ""))
    return out
