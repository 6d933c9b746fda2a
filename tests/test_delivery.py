"""Checkpoint delivery: a rank on a machine without the parent checkpoint gets a verified copy from MLflow
before it loads it (two gloo ranks, each with its own store, playing two machines; real MLflow SQLite store)."""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed import run_ranks
from helpers import model_cfg, reteq_cache  # noqa: F401

from reteq import tracking as T
from reteq.mlflow_store import ensure_experiment, tracking_client
from reteq.pipeline.context import CheckpointStore
from reteq.sweep import record
from reteq.sweep.delivery import CorruptArtifact, mlflow_fetcher
from reteq.train.checkpoint import CheckpointError, is_complete, read_manifest, save_checkpoint
from reteq.train.worker_context import WorkerContext


def test_a_node_nobody_published_is_a_clear_error(tmp_path):
    store = CheckpointStore(tmp_path / "store", fetch=lambda key, target: None)
    with pytest.raises(CheckpointError, match="node abc: no verified checkpoint in .* not published anywhere"):
        store.ensure_local("abc", WorkerContext())


def test_a_fetch_failure_is_named_not_hung(tmp_path):
    def broken(key, target):
        raise OSError("artifact store unreachable")

    with pytest.raises(CheckpointError, match="OSError: artifact store unreachable"):
        CheckpointStore(tmp_path / "store", fetch=broken).ensure_local("abc", WorkerContext())


@pytest.mark.usefixtures("reteq_cache")
def test_the_rank_on_the_other_machine_fetches_the_node_from_mlflow(tmp_path, sqlite_tracking):
    uri, artifacts = sqlite_tracking
    exp = ensure_experiment(uri, "test", artifacts)
    parent = record.parent_run(tracking_client(uri), exp, "test", "digest")
    main, other = run_ranks("dist_jobs:two_machine_delivery", 2, tmp_path / "run", uri=uri, experiment_id=exp,
                            parent_run=parent)
    assert main["steps"] == other["steps"] == 2
    assert other["has"] and other["files"] == main["files"]  # the same sha256 manifest, verified on arrival
    assert other["stores"] == main["stores"] == [main["node"]]  # no temp folders left behind


@pytest.mark.usefixtures("reteq_cache")
def test_delivery_replaces_a_corrupt_local_copy_and_names_a_bad_artifact(tmp_path, sqlite_tracking):
    """The fetcher itself, not only ensure_local, never keeps a corrupt copy: a local checkpoint whose sha256
    fails is replaced by the verified MLflow artifact; a bad artifact is a CheckpointError naming the run."""
    from reteq.models import load_model

    uri, artifacts = sqlite_tracking
    exp = ensure_experiment(uri, "test", artifacts)
    c = tracking_client(uri)
    parent = record.parent_run(c, exp, "test", "digest")
    key = "nodekey"
    made = save_checkpoint(load_model(model_cfg(), seed=0), tmp_path / "made" / key, key, {"stage": "inst"})
    rid = record.record_reused_node(c, exp, parent, {T.TAG_KIND: T.KIND_FINETUNE, T.TAG_PLAN_KEY: key}, made)

    target = tmp_path / "machine" / key  # this machine's copy: same files, weights corrupted
    save_checkpoint(load_model(model_cfg(), seed=0), target, key, {"stage": "inst"})
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    assert not is_complete(target, key)
    fetch = mlflow_fetcher(uri, exp)
    assert fetch(key, target) == target
    assert is_complete(target, key) and read_manifest(target)["files"] == read_manifest(made)["files"]
    assert sorted(p.name for p in target.parent.iterdir()) == [key]  # no temp folders left behind
    assert fetch("unpublished", tmp_path / "machine" / "unpublished") is None

    artifact = Path(artifacts.removeprefix("file://")) / "test" / rid / "artifacts" / T.ARTIFACT_CHECKPOINT
    # unreadable (object storage unreachable): an error, but the run stays the node's finished run
    artifact.rename(artifact.with_name("away"))
    with pytest.raises(CheckpointError, match=f"node {key}: MLflow run {rid}: checkpoint artifact unreadable"):
        fetch(key, tmp_path / "other" / key)
    assert record.finished_nodes(c, exp)[key]["run_id"] == rid
    artifact.with_name("away").rename(artifact)
    # read, and failing sha256: the run is marked corrupt on the spot, so the driver retrains the node
    (artifact / "model.safetensors").write_bytes(b"bad")
    with pytest.raises(CorruptArtifact, match=f"node {key}: MLflow run {rid} holds a bad checkpoint"):
        fetch(key, tmp_path / "other" / key)
    assert not (tmp_path / "other" / key).exists()
    assert record.finished_nodes(c, exp) == {} and c.get_run(rid).data.tags[T.TAG_STATUS] == T.STATUS_CORRUPT
