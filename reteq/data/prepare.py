"""`reteq data prepare`: materialise every stage of a sweep (and its math eval set) to local Parquet, once.

A cluster sweep should not have every worker download (or be refused by) a gated hub dataset. `prepare` writes
each stage's conversations to `<out_dir>/<stage>-<key>.parquet` (one `messages` column) and a `manifest.json`
with, per stage, the row count, the Parquet file's sha256, the source id and revision, the converter and its
transform version. The key hashes the source spec and the transform version (and a local file's content), so:
- a later run with the same manifest reuses the local copy (checked by sha256) instead of downloading again;
- a changed source, revision, `n` or transform gets a new file instead of silently reusing a stale one;
- several configs can share one data folder (`by_key` indexes every file prepared there).
Gated data can be prepared on a machine with access and the folder copied: `lookup_prepared` finds it by key.

Files and the manifest are written to a temporary name and renamed, so a reader never sees a partial file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reteq.config import DataSource, SweepConfig
from reteq.data import synthetic
from reteq.data.hub import converter_for
from reteq.data.sources import load_conversations, read_local
from reteq.digest import MANIFEST, read_manifest, sha256_file, spec_hash
from reteq.errors import BadInput, PrepareError
from reteq.resources import write_whole

FORMAT = "reteq-prepared/1"
LOCAL_VERSION = "local/1"


def transform_of(source: DataSource) -> tuple[str, str]:
    """(converter name, transform version) of a source: what turns its raw rows into conversations."""
    if source.kind == "hub":
        converter = converter_for(source)
        return converter.name, converter.version
    if source.kind == "synthetic":
        return f"synthetic:{source.task}", str(getattr(synthetic, "TRANSFORM_VERSION", "synthetic"))
    content = sha256_file(Path(source.path or "").expanduser())[:16]
    return "local", f"{LOCAL_VERSION}+sha256:{content}"


def source_key(source: DataSource) -> str:
    """Content address of a prepared source: its spec plus the transform version."""
    return spec_hash({"source": source.model_dump(mode="json"), "transform": transform_of(source)[1]})


def prepared_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The data folder's manifest, or {} when it is missing, unreadable or of another format (then everything
    is rebuilt)."""
    manifest = read_manifest(out_dir)
    return manifest if manifest is not None and manifest.get("format") == FORMAT else {}


def write_parquet(conversations: list[dict], path: Path) -> None:
    """A `messages` column (list<struct<role: string, content: string>>) and a nullable `group` string column
    (the stratum of eval samples), written atomically."""
    # lazy: pyarrow only when Parquet is read or written (reteq.data.parquet imports it)
    from reteq.data import parquet

    table = parquet.conversations_table(conversations)
    write_whole(path, lambda tmp: parquet.write_table(table, tmp))


def read_prepared(path: str | Path) -> list[dict]:
    """Conversations of a prepared Parquet file (validated like any local data file)."""
    return read_local(path)


def _valid(entry: dict[str, Any] | None, out_dir: Path) -> Path | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        return None
    path = out_dir / entry["file"]
    return path if path.is_file() and sha256_file(path) == entry.get("sha256") else None


def lookup_prepared(source: DataSource, data_dir: str | Path) -> Path | None:
    """The prepared Parquet for `source` in data_dir (same spec and transform, sha256 intact), else None."""
    data_dir = Path(data_dir)
    try:
        key = source_key(source)
    except (OSError, BadInput):
        return None
    return _valid(prepared_manifest(data_dir).get("by_key", {}).get(key), data_dir)


def _safe_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "stage"


def _materialise(label: str, field: str, source: DataSource, out_dir: Path, known: dict[str, Any],
                 report: Callable[[str], None]) -> dict[str, Any]:
    try:
        converter, transform = transform_of(source)
        key = source_key(source)
        reused = _valid(known.get(key), out_dir)
        if reused is not None:
            entry = dict(known[key])
            report(f"{label}: {entry['rows']} rows, reused {reused}")
            return entry
        conversations = load_conversations(source)
    except (BadInput, OSError) as e:
        raise PrepareError(field, str(e)) from None
    path = out_dir / f"{_safe_label(label)}-{key[:12]}.parquet"
    write_parquet(conversations, path)
    entry = {
        "file": path.name, "rows": len(conversations), "sha256": sha256_file(path), "key": key,
        "kind": source.kind, "source_id": source.id or source.path or f"synthetic:{source.task}",
        "revision": source.revision, "converter": converter, "transform": transform,
        "source": source.model_dump(mode="json"),
    }
    report(f"{label}: {entry['rows']} rows, wrote {path}")
    return entry


def prepare(cfg: SweepConfig, out_dir: str | Path, report: Callable[[str], None] | None = None) -> Path:
    """Materialise every stage (and `eval.math_source` when set) under out_dir; return the manifest path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = report or (lambda _line: None)
    previous = prepared_manifest(out_dir)
    known: dict[str, Any] = dict(previous.get("by_key", {}))
    stages = {}
    for i, stage in enumerate(cfg.stages):
        stages[stage.name] = entry = _materialise(stage.name, f"stages[{i}].source", stage.source, out_dir,
                                                  known, report)
        known[entry["key"]] = entry
    evals = {}
    if cfg.eval.math_source is not None:
        evals["math"] = entry = _materialise("eval-math", "eval.math_source", cfg.eval.math_source, out_dir,
                                             known, report)
        known[entry["key"]] = entry
    by_key = {k: e for k, e in known.items() if _valid(e, out_dir) is not None}
    manifest = {"format": FORMAT, "config": cfg.name, "config_digest": cfg.digest(), "stages": stages,
                "eval": evals, "by_key": by_key}
    path = out_dir / MANIFEST
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    write_whole(path, lambda tmp: tmp.write_text(text))
    return path
