"""Make the local store and the MLflow record agree before a sweep uses them.

A checkpoint in the store whose sha256 fails is removed and replaced by its node's MLflow artifact when that
verifies; when the artifact is bad too, its run is marked corrupt (so it no longer counts as the node's
finished run) and the node is retrained. A complete checkpoint without a finished record gets one written
(a crash between publishing and recording leaves exactly that).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reteq.mlflow_store import finished_runs
from reteq.sweep.delivery import CorruptArtifact, fetch_run_checkpoint, mark_corrupt
from reteq.sweep.record import record_reused_node
from reteq.train.checkpoint import discard, is_complete


def fetch_node_checkpoint(c, key: str, run_id: str, target: Path) -> Path | None:
    """`run_id`'s checkpoint published at `target` (a corrupt copy there is replaced), or None after marking the
    run corrupt when its artifact fails verification (the caller retrains the node). An artifact that cannot be
    read (object storage unreachable) raises its CheckpointError: the bytes may be fine, so nothing is marked."""
    try:
        return fetch_run_checkpoint(c.tracking_uri, run_id, key, target)
    except CorruptArtifact as e:
        mark_corrupt(c, run_id, str(e))
        return None


@dataclass(frozen=True)
class RecordTarget:
    """Where a repaired node's record goes: the MlflowClient `c`, the experiment, the sweep's parent run and the
    attempt that writes it."""

    c: Any
    exp_id: str
    parent_run_id: str
    attempt: str


def reconcile_nodes(into: RecordTarget, store_root: Path, nodes: dict, tags_of, needed: set[str],
                    echo=print) -> dict[str, int]:
    """Repair and record the stage nodes of the local store, before any trial uses them.

    `into`: the MLflow record; `nodes`: key -> node (plan.nodes); `tags_of(node)`: its MLflow tags; `needed`: the
    keys a pending leaf uses (only those are hashed, plus any checkpoint without a record). Returns counts per
    outcome.
    """
    c, exp_id = into.c, into.exp_id
    counts = {"recorded": 0, "repaired": 0, "retrain": 0}
    for key, node in nodes.items():
        path = Path(store_root) / key
        if not path.exists():
            continue
        runs = finished_runs(c, exp_id, key)
        if runs and key not in needed:
            continue
        if is_complete(path, key):
            if not runs:
                rid = record_reused_node(c, exp_id, into.parent_run_id, tags_of(node), path, into.attempt)
                echo(f"[node {key[:8]}] checkpoint in the store had no finished record: recorded as run {rid}")
                counts["recorded"] += 1
            continue
        discard(path)
        if runs and fetch_node_checkpoint(c, key, runs[0].info.run_id, path) is not None:
            echo(f"[node {key[:8]}] local checkpoint failed sha256: replaced by the artifact of run "
                 f"{runs[0].info.run_id}")
            counts["repaired"] += 1
        else:
            echo(f"[node {key[:8]}] local checkpoint failed sha256 and no verified artifact exists: retraining")
            counts["retrain"] += 1
    return counts
