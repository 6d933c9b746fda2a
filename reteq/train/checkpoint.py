"""Checkpoints: Hugging Face files (safetensors only) plus a manifest with the sha256 of every file.

A checkpoint is written into a temporary sibling folder and published with one atomic rename, so a reader
sees either nothing or a complete, verified checkpoint; `verify_checkpoint` refuses anything else.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(model, target: str | Path, key: str, meta: dict[str, Any] | None = None) -> Path:
    """Save `model` (a peft adapter or a full model) to `target` atomically; return the path."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for pickle_file in list(tmp.glob("*.bin")) + list(tmp.glob("*.pt")):
            raise CheckpointError(f"refusing to publish pickle file {pickle_file.name}")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"key": key, "files": files, "meta": meta or {}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if target.exists():  # an identical node finished elsewhere first; keep the published one
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_manifest(path: str | Path) -> dict[str, Any]:
    m = Path(path) / MANIFEST
    if not m.exists():
        raise CheckpointError(f"{path}: no {MANIFEST} (partial or foreign checkpoint)")
    return json.loads(m.read_text())


def verify_checkpoint(path: str | Path, key: str | None = None) -> dict[str, Any]:
    """Check every file's sha256 against the manifest (and the node key when given); return the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    if key is not None and manifest.get("key") != key:
        raise CheckpointError(f"{path}: manifest key {manifest.get('key')} != expected {key}")
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.exists() or sha256_file(f) != digest:
            raise CheckpointError(f"{path}: {name} is missing or corrupt (sha256 mismatch)")
    return manifest


def is_complete(path: str | Path, key: str | None = None) -> bool:
    try:
        verify_checkpoint(path, key)
        return True
    except CheckpointError:
        return False
