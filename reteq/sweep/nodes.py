"""Stage nodes: the work of one node task, plain functions (its Ray task is reteq.sweep.remote.node_task).

Every missing node is submitted up front as a Ray task (reteq.sweep.remote.submit_nodes) whose argument is its
parent's object ref. Ray holds a task until its argument refs resolve, so a node starts as soon as its parent is
published, as many at once as resources allow, and holds nothing while it waits. A task returns its published
checkpoint ({key, path, run_id, published}); that return value is the ref its children and leaves depend on. A
failure flows the same way: Ray stores the error in the node's ref and every dependent task fails with it without
running, so a failed node ends exactly its branch and the driver reads, from the refs, which node failed.

Two ways to train a node, chosen by `process.in_process`:
- one CPU worker, ZeRO-0 (or no DeepSpeed): the task trains the node itself with plain torch (`train_rank`). A
  dead worker process is retried by Ray (`max_retries = execution.max_failures`); an exception in training is
  not retried.
- otherwise the task drives one TorchTrainer (DeepSpeed workers, each running `train_rank`) with Train's
  `FailureConfig(max_failures=execution.max_failures)`: a dead worker or a preempted machine restarts the
  worker group, which trains the node again from its parent, or, with `execution.checkpoint_every`, from the
  node's last mid-stage Ray Train checkpoint (reteq.sweep.stage_resume); `published_by_group` reads the result.
"""

from __future__ import annotations

import time
from typing import Any

from reteq import tracking as T
from reteq.mlflow_store import finished_run, reader
from reteq.sweep import process
from reteq.sweep.rank import Rank, rank_run, store, test_hooks
from reteq.sweep.settings import SweepRun

TRAINER_DRIVER_CPUS = 0.05  # a task that only drives a TorchTrainer; its workers ask for the real resources


def describe(node) -> str:
    return f"node {node.key[:8]} ({node.model} {T.order_tag(node.prefix)})"


def train_rank(settings: SweepRun, key: str, parent: dict | None, r: Rank | None = None, resume=None
               ) -> dict[str, Any]:
    """Train node `key` in this process (a rank of a worker group, or the whole node when in process);
    `resume`: a Ray Train worker's mid-stage checkpoints (reteq.sweep.stage_resume)."""
    # lazy: keeps torch out of the light processes (driver, Tune trials, the CLI)
    from reteq.pipeline.node import train_node

    started = time.time()
    r = r or Rank()
    _, plan = process.plan_of(settings)
    node = plan.nodes[key]
    if r.rank == 0:
        test_hooks(node)
    with rank_run(settings, key, node.model, r) as run:
        parent_path = run.store.ensure_local(parent["key"], run.worker) if parent else None
        path = train_node(run, node, parent_path, resume)
    return {"key": key, "path": str(path), "run_id": run.hooks.run_id(key),
            "started": started, "published": time.time()}


def published_by_group(settings: SweepRun, key: str, result, started: float) -> dict[str, Any]:
    """What a worker group that trained node `key` published (its Train `result`): the mid-stage Ray Train
    checkpoints are removed (dead weight once the node is published)."""
    if result.checkpoint is not None and not result.error:
        try:
            result.filesystem.delete_dir(result.path)
        except Exception as e:
            print(f"{key[:8]}: could not remove the node's Ray Train checkpoints at {result.path}: {e}", flush=True)
    # Train V2's Result.metrics holds only metrics reported with a checkpoint, never the ranks' final report:
    # the published node is read back from where rank 0 put it (the store, and its MLflow run)
    return {"key": key, "path": str(store(settings).path(key)), "run_id": _finished_run(settings, key),
            "started": started, "published": time.time()}


def _finished_run(settings: SweepRun, key: str) -> str:
    return finished_run(reader(settings.tracking_uri), settings.experiment_id, key) or ""


def task_options(cfg, settings: SweepRun) -> dict[str, Any]:
    """A node task's Ray options. `settings` is the driver's (its `in_process` and `runtime_env` decided there
    once)."""
    ex = cfg.execution
    return {"num_cpus": settings.task_cpus if settings.in_process else TRAINER_DRIVER_CPUS,
            "max_retries": ex.max_failures, "retry_exceptions": False,
            "runtime_env": settings.runtime_env,  # one pool of warm workers with the leaves
            "scheduling_strategy": "DEFAULT",  # never inside the submitter's placement group (remote.Launcher)
            # an in-process task is the node's one worker: it goes where execution.worker_resources pin workers
            "resources": dict(ex.worker_resources) if settings.in_process else {}}


def needed_nodes(plan, leaves) -> list[str]:
    """Every node some leaf depends on (its parent, a retrain node where it has one) and their ancestors, each
    once, parents before children."""
    out: dict[str, None] = {}
    for leaf in leaves:
        for dep in leaf_dependencies(leaf):
            for node in plan.chain(dep):
                out.setdefault(node.key, None)
    return list(out)


def leaf_dependencies(leaf) -> list[str]:
    """The nodes that must be published before a leaf starts: its parent, and its retrain node if it has one."""
    retrain = getattr(leaf, "retrain", None)
    return [leaf.parent] + ([retrain] if retrain else [])
