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
            for i, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: row {i}: not valid JSON ({e.msg})") from None
        elif suffix == ".json":
            rows = json.loads(path.read_text())
            if not isinstance(rows, list):
                raise DataError(f"{path}: a .json data file must hold a list of rows")
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            raise DataError(f"{path}: unsupported data file type {suffix!r} (use .json, .jsonl or .parquet)")
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg})") from None
    return [validate_conversation(r, str(path), i) for i, r in enumerate(rows)]


def load_conversations(source: DataSource) -> list[dict]:
    """The conversations a stage trains on, truncated to `source.n` rows when given."""
    if source.kind == "synthetic" and (source.task or "").startswith("rcu_"):
        from reteq.data.rcu import stage_datasets

        rows = stage_datasets()[(source.task or "")[4:]]
    elif source.kind == "synthetic":
        rows = synthetic.generate(source.task or "", source.n or 64, source.seed)
    elif source.kind == "local":
        rows = read_local(source.path or "")
    else:
        from reteq.data.hub import load_hub

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
        from reteq.data.gsm8k import load_gsm8k_test

        return load_gsm8k_test(source)[:n]
    from reteq.data.gsm8k import extract_answer

    out = []
    for conv in read_local(source.path or "")[:n]:
        user = next(m["content"] for m in conv["messages"] if m["role"] == "user")
        answer = conv["messages"][-1]["content"]
        out.append((user, extract_answer(answer) or ""))
    return out
