"""Content addresses: the sha256 of a file (checkpoints, prepared data) and of a JSON-able spec (keys, digests),
and the manifest.json that lists a folder's files with their sha256 (a checkpoint, a prepared-data folder)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


MANIFEST = "manifest.json"


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The folder's manifest.json, or None when it is missing or not a JSON object (the caller decides what
    that means: a checkpoint is refused, a data folder is rebuilt)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def spec_hash(obj: Any, length: int = 16) -> str:
    """The first `length` hex digits of the sha256 of `obj` as sorted JSON (non-JSON values via str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
