"""Checkpoint delivery across nodes: a node's checkpoint, fetched from MLflow into this machine's local store.

A trial's ranks may sit on several machines (Ray's PACK placement spreads a 4-worker trial over 1-GPU nodes),
and each machine has its own checkpoint store. MLflow (its artifact store: S3 on a cluster) holds every
published node. `mlflow_fetcher` finds the finished run of a node key, downloads its checkpoint artifact next to
the target, verifies the sha256 manifest, and publishes it with one rename. `CheckpointStore.ensure_local` (in
reteq.pipeline) calls it on each node's local rank 0 while the other ranks wait.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from reteq import tracking as T

Fetch = Callable[[str, Path], "Path | None"]  # (node key, target folder) -> target, or None when not published


def local_store_root(default: str | Path) -> Path:
    """This machine's checkpoint store: $RETEQ_CHECKPOINT_STORE (set per node, e.g. a local NVMe folder) or the
    sweep's `work_dir/checkpoints`."""
    return Path(os.environ.get("RETEQ_CHECKPOINT_STORE") or default)


def find_node_run(client, experiment_id: str, key: str) -> str | None:
    """The run id of a finished node (status done) with this key, or None."""
    runs = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.`{T.TAG_PLAN_KEY}` = '{key}' and "
                                            f"tags.`{T.TAG_STATUS}` = '{T.STATUS_DONE}'")
    return runs[0].info.run_id if runs else None


def mlflow_fetcher(tracking_uri: str, experiment_id: str) -> Fetch:
    """A Fetch that downloads a node's checkpoint artifact from MLflow and verifies it before publishing."""

    def fetch(key: str, target: Path) -> Path | None:
        import mlflow

        from reteq.train.checkpoint import CheckpointError, verify_checkpoint

        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        run_id = find_node_run(client, experiment_id, key)
        if run_id is None:
            return None
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".fetch-{key}-", dir=target.parent))
        try:
            got = Path(client.download_artifacts(run_id, T.ARTIFACT_CHECKPOINT, str(tmp)))
            try:
                verify_checkpoint(got, key)
            except CheckpointError as e:
                raise CheckpointError(f"node {key}: MLflow run {run_id} holds a bad checkpoint ({e})") from None
            if not target.exists():  # another process on this machine may have published it meanwhile
                os.replace(got, target)
            return target
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return fetch

