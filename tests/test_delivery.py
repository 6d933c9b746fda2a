"""Checkpoint delivery: a rank on a machine without the parent checkpoint gets a verified copy from MLflow
before it loads it (two gloo ranks, each with its own store, playing two machines; real MLflow SQLite store)."""

from __future__ import annotations

import pytest
from distributed import run_ranks
from helpers import reteq_cache  # noqa: F401

from reteq.pipeline import CheckpointStore
from reteq.sweep import record
from reteq.sweep.mlflow_store import ensure_experiment, tracking_client
from reteq.train.checkpoint import CheckpointError
from reteq.train.recipes import WorkerContext


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
