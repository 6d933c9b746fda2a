"""Checkpoint delivery across nodes: a node's checkpoint, fetched from MLflow into this machine's local store.

A trial's ranks may sit on several machines (Ray's PACK placement spreads a 4-worker trial over 1-GPU nodes),
and each machine has its own checkpoint store. MLflow (its artifact store: S3 on a cluster) holds every
published node. `mlflow_fetcher` finds the finished run of a node key (reteq.mlflow_store.finished_run); `fetch_run_checkpoint` downloads its
checkpoint artifact next to the target, verifies the sha256 manifest, and publishes it with one rename.
`CheckpointStore.ensure_local` (in reteq.pipeline.context) calls the fetcher on each machine's local rank 0 (the first
rank of the group on that Ray node) while the other ranks wait.

An artifact that downloads but fails its sha256 (`CorruptArtifact`) is marked on the spot: its run stops being
the node's finished run, so the driver retrains the node (reteq.sweep.driver, one more round) instead of every
leaf below failing on the same bytes. A fresh autoscaled node has no local copy to fall back on, so object
storage is the only copy it can check. An artifact that cannot be read at all (storage unreachable) is NOT
marked: the bytes may be fine, and retraining would only hide the outage.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlflow
import ray

from reteq import environment
from reteq import tracking as T
from reteq.mlflow_store import finished_run, reader
from reteq.sweep.lifecycle import finish_run
from reteq.train.checkpoint import CheckpointError, publish, verify_checkpoint


class CorruptArtifact(CheckpointError):
    """A node's MLflow checkpoint artifact was read and fails verification (sha256, zero-size tensor)."""


Fetch = Callable[[str, Path], "Path | None"]  # (node key, target folder) -> target, or None when not published


def local_store_root(default: str | Path) -> Path:
    """This machine's checkpoint store: $RETEQ_CHECKPOINT_STORE (set per node, e.g. a local NVMe folder) or the
    sweep's `work_dir/checkpoints`. `{node}` in the variable is this Ray node's id: one value for every node of
    a cluster whose nodes share a file system (a test cluster of raylets on one machine) still gives each node
    a store of its own, as separate machines have."""
    where = environment.get(environment.CHECKPOINT_STORE)
    if where and "{node}" in where:
        where = where.replace("{node}", ray.get_runtime_context().get_node_id())
    return Path(where or default)


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
            raise CorruptArtifact(f"node {key}: MLflow run {run_id} holds a bad checkpoint ({e})") from None
        return publish(got, target, key)  # another process may have published it meanwhile: kept if complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def mark_corrupt(c, run_id: str, reason: str) -> None:
    """The run's checkpoint cannot be trusted: it stops being the node's finished run (FAILED, status corrupt)."""
    finish_run(c, run_id, T.STATUS_CORRUPT, f"{reason}; the node is retrained under a new run")


def mlflow_fetcher(tracking_uri: str, experiment_id: str) -> Fetch:
    """A Fetch that finds the node's finished run in MLflow and fetches its checkpoint (None: not published).
    A corrupt artifact marks its run (`mark_corrupt`) before the CorruptArtifact goes up."""

    def fetch(key: str, target: Path) -> Path | None:
        c = reader(tracking_uri)
        run_id = finished_run(c, experiment_id, key)
        if run_id is None:
            return None
        try:
            return fetch_run_checkpoint(tracking_uri, run_id, key, target)
        except CorruptArtifact as e:
            mark_corrupt(c, run_id, str(e))
            raise

    return fetch
