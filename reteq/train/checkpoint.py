"""Checkpoints: Hugging Face files (safetensors only) plus a manifest with the sha256 of every file.

A checkpoint is written into a temporary sibling folder and published with one atomic rename, so a reader
sees either nothing or a complete, verified checkpoint; `verify_checkpoint` refuses anything else.
Under ZeRO-3 each rank holds only a shard of every partitioned parameter (shape (0,) outside a gather), so the
weights are gathered first (`gathered_state_dict`, on every rank) and a file holding a zero-size tensor is
never published nor accepted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import safe_open

from reteq.digest import MANIFEST, read_manifest, sha256_file
from reteq.errors import CheckpointError


def gathered_state_dict(module, is_main: bool) -> dict[str, Any] | None:
    """The full weights of a ZeRO-3 partitioned `module` on the main rank (CPU tensors); None elsewhere and
    when nothing is partitioned (then `save_pretrained` reads the module itself). Collective: call it on
    every rank. A peft model keeps only its trainable (adapter) tensors: the frozen base is not saved anyway.
    One parameter is gathered at a time, so no rank ever holds more than one full tensor beyond its shard."""
    state = module.state_dict(keep_vars=True)
    if not any(hasattr(v, "ds_id") for v in state.values()):
        return None
    # lazy: optional DeepSpeed, only on its path
    import deepspeed

    adapter_only = hasattr(module, "peft_config")
    out: dict[str, Any] = {}
    for name, value in state.items():
        if adapter_only and not value.requires_grad:
            continue
        if hasattr(value, "ds_id"):
            with deepspeed.zero.GatheredParameters([value], modifier_rank=None):
                if is_main:
                    out[name] = value.detach().to("cpu", copy=True)
        elif is_main:
            out[name] = value.detach().to("cpu", copy=True)
    return out if is_main else None


def zero_size_tensors(folder: str | Path) -> list[str]:
    """`file:tensor` for every zero-size tensor in the safetensors files of `folder` (headers only)."""
    empty = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                if 0 in sf.get_slice(name).get_shape():
                    empty.append(f"{f.name}:{name}")
    return empty


def save_checkpoint(model, target: str | Path, key: str, meta: dict[str, Any] | None = None,
                    state_dict: dict[str, Any] | None = None) -> Path:
    """Save `model` (a peft adapter or a full model) to `target` atomically; return the path.
    `state_dict`: the weights to write instead of the module's own (the gathered ZeRO-3 weights)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        extra = {"state_dict": state_dict} if state_dict is not None else {}
        model.save_pretrained(tmp, safe_serialization=True, **extra)
        for pickle_file in list(tmp.glob("*.bin")) + list(tmp.glob("*.pt")):
            raise CheckpointError(f"refusing to publish pickle file {pickle_file.name}")
        empty = zero_size_tensors(tmp)
        if empty:
            raise CheckpointError(f"refusing to publish {key}: {len(empty)} zero-size tensors ({empty[0]}, ...); "
                                  "ZeRO-3 weights must be gathered before saving")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"key": key, "files": files, "meta": meta or {}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        publish(tmp, target, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def publish(tmp: Path, target: Path, key: str) -> Path:
    """Move the complete checkpoint `tmp` to `target` with one rename. A complete checkpoint already there (an
    identical node finished elsewhere first) is kept; a corrupt or partial one is replaced, never kept."""
    if target.exists() and is_complete(target, key):
        shutil.rmtree(tmp)
        return target
    discard(target)
    os.replace(tmp, target)
    return target


def discard(path: str | Path) -> bool:
    """Remove a checkpoint folder: first renamed aside (one atomic step, so no reader sees it half deleted)."""
    path = Path(path)
    if not path.exists():
        return False
    aside = Path(tempfile.mkdtemp(prefix=f".discard-{path.name}-", dir=path.parent))
    os.replace(path, aside / path.name)
    shutil.rmtree(aside, ignore_errors=True)
    return True


def checkpoint_manifest(path: str | Path) -> dict[str, Any]:
    """A checkpoint's manifest; CheckpointError when it has none (a partial or foreign checkpoint)."""
    manifest = read_manifest(path)
    if manifest is None:
        raise CheckpointError(f"{path}: no {MANIFEST}, or not JSON (partial or foreign checkpoint)")
    return manifest


def verify_checkpoint(path: str | Path, key: str | None = None) -> dict[str, Any]:
    """Check every file's sha256 against the manifest (and the node key when given); return the manifest."""
    path = Path(path)
    manifest = checkpoint_manifest(path)
    if key is not None and manifest.get("key") != key:
        raise CheckpointError(f"{path}: manifest key {manifest.get('key')} != expected {key}")
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.exists() or sha256_file(f) != digest:
            raise CheckpointError(f"{path}: {name} is missing or corrupt (sha256 mismatch)")
    empty = zero_size_tensors(path)  # published before zero-size checks existed: never reuse it
    if empty:
        raise CheckpointError(f"{path}: zero-size tensor {empty[0]} (an ungathered ZeRO-3 save)")
    return manifest


def is_complete(path: str | Path, key: str | None = None) -> bool:
    try:
        verify_checkpoint(path, key)
        return True
    except CheckpointError:
        return False
