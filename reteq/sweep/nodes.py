"""Stage nodes as Ray tasks whose dependencies are object refs.

Every missing node is submitted up front as `node_task.remote(settings, key, parent_ref)`. Ray holds a task until
its argument refs resolve, so a node starts as soon as its parent is published, as many at once as resources
allow, and holds nothing while it waits. A task returns its published checkpoint ({key, path, run_id,
published}); that return value is the ref its children and leaves depend on. A failure flows the same way:
Ray stores the error in the node's ref and every dependent task fails with it without running, so a failed
node ends exactly its branch and the driver reads, from the refs, which node failed.

Two ways to train a node, chosen by `worker.in_process`:
- one CPU worker, ZeRO-0 (or no DeepSpeed): the task trains the node itself with plain torch. A dead worker
  process is retried by Ray (`max_retries = execution.max_failures`); an exception in training is not retried.
- otherwise the task drives one TorchTrainer (DeepSpeed workers) with Train's
  `FailureConfig(max_failures=execution.max_failures)`: a dead worker or a preempted machine restarts the
  worker group, which trains the node again from its parent, or, with `execution.checkpoint_every`, from the
  node's last mid-stage Ray Train checkpoint (reteq.sweep.stage_resume).
"""

from __future__ import annotations

import time
from typing import Any

import ray

from reteq import tracking as T
from reteq.mlflow_store import finished_run, reader
from reteq.resources import one_line
from reteq.sweep import worker
from reteq.sweep.settings import SweepRun
from reteq.sweep.stage_resume import ParentRunParams, StageResume
from reteq.sweep.worker import NodeFailed

# Imports inside functions below are heavy (torch through reteq.pipeline, Ray Train): the driver and the light
# Tune trials import this module (leaf_dependencies) without them.

TRAINER_DRIVER_CPUS = 0.05  # a task that only drives a TorchTrainer; its workers ask for the real resources


def _describe(node) -> str:
    return f"node {node.key[:8]} ({node.model} {T.order_tag(node.prefix)})"


def train_rank(settings: SweepRun, key: str, parent: dict | None, r=None, resume=None) -> dict[str, Any]:
    """Train node `key` in this process (a rank of a worker group, or the whole node when in process);
    `resume`: a Ray Train worker's mid-stage checkpoints (reteq.sweep.stage_resume)."""
    # lazy: keeps torch out of the light processes (driver, Tune trials, the CLI)
    from reteq.pipeline import train_node

    started = time.time()
    r = r or worker.Rank()
    _, plan = worker.plan_of(settings)
    node = plan.nodes[key]
    if r.rank == 0:
        worker.test_hooks(node)
    with worker.rank_run(settings, key, node.model, r) as run:
        parent_path = run.store.ensure_local(parent["key"], run.worker) if parent else None
        path = train_node(run, node, parent_path, resume)
    return {"key": key, "path": str(path), "run_id": run.hooks.run_id(key),
            "started": started, "published": time.time()}


def node_worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker of a multi-worker / GPU node."""
    # lazy: Ray Train/Tune internals only where used; planning and light processes skip them
    import ray.train

    settings = config["settings"]
    cfg, _, _ = worker.state(settings)
    c = ray.train.get_context()
    r = worker.Rank(c.get_world_rank(), c.get_world_size(), worker.deepspeed_config(settings), c.get_local_rank())
    # DeepSpeed saves the state to resume from; plain torch workers (deepspeed: null) restart the stage
    digests = ParentRunParams(settings.tracking_uri, settings.parent_run_id)  # where checkpoint digests live
    resume = (StageResume.from_ray_train(config["key"], cfg.execution.checkpoint_every, r.rank, digests)
              if r.ds else None)
    info = train_rank(settings, config["key"], config["parent"], r, resume)
    ray.train.report(info)


def _train_in_group(settings: SweepRun, key: str, parent: dict | None, cfg) -> dict[str, Any]:
    """A worker group of `execution.workers` ranks trains the node (each runs `train_rank`)."""
    # lazy: Ray Train/Tune internals only where used; planning and light processes skip them
    from ray.train import CheckpointConfig

    trainer = worker.worker_group(settings, cfg, node_worker_loop, {"settings": settings, "key": key, "parent": parent},
                                  f"node-{key[:12]}",
                                  checkpoint_config=CheckpointConfig(num_to_keep=1))  # the last mid-stage one
    started = time.time()
    result = trainer.fit()
    if result.checkpoint is not None and not result.error:  # a mid-stage checkpoint: dead weight once published
        try:
            result.filesystem.delete_dir(result.path)
        except Exception as e:
            print(f"{key[:8]}: could not remove the node's Ray Train checkpoints at {result.path}: {e}", flush=True)
    # Train V2's Result.metrics holds only metrics reported with a checkpoint, never the ranks' final report:
    # the published node is read back from where rank 0 put it (the store, and its MLflow run)
    return {"key": key, "path": str(worker.store(settings).path(key)), "run_id": _finished_run(settings, key),
            "started": started, "published": time.time()}


def _finished_run(settings: SweepRun, key: str) -> str:
    return finished_run(reader(settings.tracking_uri), settings.experiment_id, key) or ""


@ray.remote
def node_task(settings: SweepRun, key: str, parent: dict | None) -> dict[str, Any]:
    """One stage node, started by Ray once `parent` (the parent node's published checkpoint) exists."""
    cfg, plan = worker.plan_of(settings)
    node = plan.nodes[key]
    try:
        if settings.in_process:
            return train_rank(settings, key, parent)
        return _train_in_group(settings, key, parent, cfg)
    except NodeFailed:
        raise
    except Exception as e:
        raise NodeFailed(key, f"{_describe(node)} failed: {one_line(e)}") from e
    finally:
        worker.release_memory()


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


def submit_nodes(cfg, plan, keys: list[str], settings_ref, done: dict[str, dict[str, str]], settings: SweepRun) -> dict[str, Any]:
    """key -> object ref of the node's published checkpoint: `ray.put` for nodes already in MLflow, a task for
    the rest (submitted parents first, so each task names its parent's ref). `settings` is the driver's (its
    `in_process` and `runtime_env` decided there once)."""
    refs: dict[str, Any] = {}
    ex = cfg.execution
    opts = {"num_cpus": settings.task_cpus if settings.in_process else TRAINER_DRIVER_CPUS,
            "max_retries": ex.max_failures, "retry_exceptions": False,
            "runtime_env": settings.runtime_env,  # one pool of warm workers with the leaves
            "scheduling_strategy": "DEFAULT",  # never inside the submitter's placement group (launcher.Launcher)
            # an in-process task is the node's one worker: it goes where execution.worker_resources pin workers
            "resources": dict(ex.worker_resources) if settings.in_process else {}}
    for key in keys:
        node = plan.nodes[key]
        if key in done:
            refs[key] = ray.put({"key": key, "path": done[key].get("checkpoint", ""),
                                 "run_id": done[key].get("run_id", ""), "published": 0.0})
            continue
        parent = refs[node.parent] if node.parent else None
        refs[key] = node_task.options(name=f"node-{T.order_tag(node.prefix)}", **opts).remote(settings_ref, key, parent)
    return refs

