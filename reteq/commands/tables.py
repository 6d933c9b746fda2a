"""`reteq tables LEAVES.csv`: every results table of a leaves.csv as Markdown (reteq.analysis.leaves_markdown).

A design merged from several stores (`reteq report --leaves-merge`) has its numbers in leaves.csv alone; this
writes the tables a results page quotes (docs/results_smol/tables.md), so nothing is pasted by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from reteq.analysis import leaves_markdown
from reteq.analysis.recency_stats import EQUAL_FORGETTING_TARGET
from reteq.errors import BadInput
from reteq.resources import write_whole

MAX_BYTES = 64 * 1024 * 1024  # a leaves.csv of 100,000 leaves is ~40 MB; anything larger is not one


def read_leaves(path: Path) -> pl.DataFrame:
    """leaves.csv, checked before anything is written: readable, bounded, with the columns the tables read and at
    least one finished leaf; else one line naming the file and the field."""
    if not path.is_file():
        raise BadInput(f"{path}: no such file (a leaves.csv written by `reteq report --leaves-out`)")
    if path.stat().st_size > MAX_BYTES:
        raise BadInput(f"{path}: {path.stat().st_size} bytes, more than the {MAX_BYTES} a leaves.csv may have")
    try:
        leaves = pl.read_csv(path, infer_schema_length=None)
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as err:
        raise BadInput(f"{path}: not a readable CSV ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    missing = [c for c in leaves_markdown.COLUMNS if c not in leaves.columns]
    if missing:
        raise BadInput(f"{path}: {missing[0]}: column missing (not a reteq leaves.csv)")
    for column in ("p", "seed", "lr", "forget_score"):
        if not leaves.schema[column].is_numeric():
            raise BadInput(f"{path}: {column}: not numeric ({leaves.schema[column]})")
    if not leaves_markdown.done_leaves(leaves).height:
        raise BadInput(f"{path}: status: no leaf is 'done', so there is nothing to tabulate")
    return leaves


def tables_command(leaves_path: str, out: str | None, forget_target: float | None = None) -> int:
    """Render the tables of `leaves_path` to `out` (written whole or not at all) or to stdout."""
    target = EQUAL_FORGETTING_TARGET if forget_target is None else forget_target
    if not math.isfinite(target):
        raise BadInput(f"tables: --forget-target: must be a finite forget score, got {target}")
    source = Path(leaves_path)
    text = leaves_markdown.render(read_leaves(source), leaves_path, target)
    if out is None:
        print(text, end="")
        return 0
    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_whole(dest, lambda tmp: tmp.write_text(text))
    print(f"tables: {dest} ({len(leaves_markdown.table_rows(text))} rows from {source})")
    return 0
