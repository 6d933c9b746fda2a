"""Hub pins: every model and dataset downloaded from the hub names a commit, so what a config downloads (and what
a node or data key stands for) cannot change under the same config (#30; docs/security.md). validate, plan,
sweep and data prepare call `check_pinned` before anything is downloaded."""

from __future__ import annotations

import re
from pathlib import Path

from reteq.config import DataSource, SweepConfig
from reteq.errors import ConfigError


def hub_sources(cfg: SweepConfig) -> list[tuple[str, DataSource]]:
    """(field, source) of every dataset read through the hub (`kind: hub`)."""
    found = [(f"stages[{i}].source", s.source) for i, s in enumerate(cfg.stages)]
    found.append(("eval.math_source", cfg.eval.math_source))
    return [(field, s) for field, s in found if s is not None and s.kind == "hub"]


# a hub revision that names content: a git commit id (40 hex digits). A branch or tag moves; a commit does not, and
# the hub's commit hashes its tree, whose large files are named by their sha256 (docs/security.md)
COMMIT = re.compile(r"[0-9a-f]{40}")


def _hub_models(cfg: SweepConfig) -> list[tuple[str, str, str | None]]:
    """(field, hub id, revision) of every model downloaded from the hub: not builtin:, not package:, not a local
    path, directory or GGUF file."""
    found = []
    for i, m in enumerate(cfg.models):
        local = m.source.startswith(("builtin:", "package:")) or Path(m.source).expanduser().exists()
        if not local:
            found.append((f"models[{i}]", m.source, m.revision))
    return found


def check_pinned(cfg: SweepConfig, config: str, allow_unpinned: bool = False) -> None:
    """Every hub model and dataset is pinned to a commit (`revision:`, 40 hex digits), so what is downloaded, and
    so what a node or data key stands for, cannot change under the same config: one line each (exit 2) for those
    that are not. `--allow-unpinned-hub` goes past it (then the hub's default branch, as it is that day)."""
    if allow_unpinned:
        return
    found = [*_hub_models(cfg)]
    found += [(field, s.id, s.revision) for field, s in hub_sources(cfg)
              if not Path(s.id or "").expanduser().exists()]  # a local folder read as a hub dataset: not downloaded
    lines = []
    for field, hub_id, revision in found:
        if revision is None or not COMMIT.fullmatch(revision):
            what = "has no `revision`" if revision is None else f"revision {revision[:60]!r} is not a commit id"
            lines.append(f"{config}: {field}.revision: hub source {hub_id} {what}: pin it to the 40-hex commit to "
                         "download (docs/security.md), or pass --allow-unpinned-hub")
    if lines:
        raise ConfigError(lines)
