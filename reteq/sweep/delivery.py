"""Checkpoint delivery across nodes: a node's checkpoint, fetched from MLflow into this machine's local store.

A trial's ranks may sit on several machines (Ray's PACK placement spreads a 4-worker trial over 1-GPU nodes),
and each machine has its own checkpoint store. MLflow (its artifact store: S3 on a cluster) holds every
published node. `mlflow_fetcher` finds the finished run of a node key (mlflow_store.finished_run); `fetch_run_checkpoint` downloads its
checkpoint artifact next to the target, verifies the sha256 manifest, and publishes it with one rename.
`CheckpointStore.ensure_local` (in reteq.pipeline) calls the fetcher on each machine's local rank 0 (the first
rank of the group on that Ray node) while the other ranks wait.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlflow

from reteq import environment
from reteq import tracking as T
from reteq.sweep.mlflow_store import finished_run, reader
from reteq.train.checkpoint import CheckpointError, publish, verify_checkpoint

Fetch = Callable[[str, Path], "Path | None"]  # (node key, target folder) -> target, or None when not published


def local_store_root(default: str | Path) -> Path:
    """This machine's checkpoint store: $RETEQ_CHECKPOINT_STORE (set per node, e.g. a local NVMe folder) or the
    sweep's `work_dir/checkpoints`."""
    return Path(environment.get(environment.CHECKPOINT_STORE) or default)


def fetch_run_checkpoint(tracking_uri: str, run_id: str, key: str, target: Path) -> Path:
    """Download `run_id`'s checkpoint artifact next to `target`, verify it for `key` (sha256 manifest, no
    zero-size tensor) and publish it at `target` with one rename; a corrupt or partial copy already at `target`
    is replaced, never kept. The one MLflow fetch path: delivery to a machine (`mlflow_fetcher`) and repair of
    the driver's store (reteq.sweep.repair) both come here. Raises CheckpointError naming the run when the
    artifact cannot be read or fails verification."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".fetch-{key}-", dir=target.parent))
    try:
        try:
            got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=T.ARTIFACT_CHECKPOINT,
                                                           dst_path=str(tmp), tracking_uri=tracking_uri))
        except Exception as e:  # noqa: BLE001 - a missing artifact is MLflow's own error type
            raise CheckpointError(f"node {key}: MLflow run {run_id}: checkpoint artifact unreadable "
                                  f"({type(e).__name__}: {e})") from None
        try:
            verify_checkpoint(got, key)
        except CheckpointError as e:
            raise CheckpointError(f"node {key}: MLflow run {run_id} holds a bad checkpoint ({e})") from None
        return publish(got, target, key)  # another process may have published it meanwhile: kept if complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def mlflow_fetcher(tracking_uri: str, experiment_id: str) -> Fetch:
    """A Fetch that finds the node's finished run in MLflow and fetches its checkpoint (None: not published)."""

    def fetch(key: str, target: Path) -> Path | None:
        run_id = finished_run(reader(tracking_uri), experiment_id, key)
        return None if run_id is None else fetch_run_checkpoint(tracking_uri, run_id, key, target)

    return fetch
