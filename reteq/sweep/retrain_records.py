"""theta_r's records as Ray tasks: one evaluation per retrain node, once its checkpoint is published.

Why a task of its own rather than part of a node or a leaf: a node already published by an earlier attempt (or by
a sweep from before records existed) still needs its record, and several leaves share one theta_r, so no leaf
owns it. Like a node task, a record task names its node's ref as an argument: Ray starts it when the node is
published, and a failed node fails it without running. It evaluates in its own process (the eval metrics of an
unlearning run's step 0), logs one MLflow run of kind "retrain" keyed by the record key, and trains nothing.
Its run is closed FAILED on an exception, and KILLED by the next attempt if its process dies (reteq.sweep.lifecycle).
"""

from __future__ import annotations

from typing import Any

import ray

from reteq import tracking as T
from reteq.resources import one_line
from reteq.sweep import worker
from reteq.sweep.settings import SweepRun
from reteq.sweep.worker import NodeFailed

# Imports inside functions below are heavy (torch): the driver imports this module to submit the tasks.


@ray.remote
def record_task(settings: SweepRun, key: str, node: dict) -> dict[str, Any]:
    """Evaluate theta_r (`node`: its published checkpoint {key, path, run_id}) and log its retrain record."""
    # lazy: keeps torch out of the light processes (driver, Tune trials, the CLI)
    from reteq.pipeline import record_retrain

    cfg, plan = worker.plan_of(settings)
    rec = plan.records[key]
    try:
        with worker.rank_run(settings, key, rec.model, worker.Rank(), context=_context(cfg, rec.model)) as run:
            path = run.store.ensure_local(rec.node, run.worker)
            record_retrain(run, rec, path, node.get("run_id", ""))
    except Exception as e:
        raise NodeFailed(key, f"retrain record {key[:8]} ({rec.model} {T.order_tag(rec.order)}) failed: "
                              f"{one_line(e)}") from e
    return {"key": key, "run_id": run.hooks.run_id(key)}


def _context(cfg, model: str):
    """One process: the task's GPU when the sweep uses GPUs (Ray sets CUDA_VISIBLE_DEVICES for the task; Train's
    get_device works only inside a worker group), else the CPU context of an in-process node."""
    # lazy: keeps torch out of the light processes (driver, Tune trials, the CLI)
    import torch

    # lazy: keeps torch out of the light processes (driver, Tune trials, the CLI)
    from reteq.train.recipes import WorkerContext

    if cfg.execution.use_gpu and torch.cuda.is_available():
        return WorkerContext.for_model(cfg, model, device=torch.device("cuda", 0))
    return worker.worker_context(cfg, model, worker.Rank())


def record_nodes(plan, records: list[str]) -> list[str]:
    """The nodes the records need (each theta_r and its ancestors), parents first."""
    return list(dict.fromkeys(n.key for k in records for n in plan.chain(plan.records[k].node)))


def submit_records(cfg, plan, records: list[str], settings_ref, node_refs: dict[str, Any], settings: SweepRun
                   ) -> dict[str, Any]:
    """record key -> ref of its task, which Ray starts once the theta_r node's ref resolves. `settings` is the
    driver's: its runtime env (ray_session.trial_runtime_env) and a task's CPU request (ray_session.task_cpus)."""
    ex = cfg.execution
    opts: dict[str, Any] = {"num_cpus": settings.task_cpus, "max_retries": ex.max_failures,
                            "retry_exceptions": False, "runtime_env": settings.runtime_env,
                            "scheduling_strategy": "DEFAULT",  # the warm workers of nodes and leaves (Launcher)
                            "resources": dict(ex.worker_resources)}  # it evaluates in this task: a worker's place
    if ex.use_gpu:
        opts["num_gpus"] = ex.gpus_per_worker
    return {k: record_task.options(name=f"retrain-{T.order_tag(plan.records[k].order)}", **opts)
            .remote(settings_ref, k, node_refs[plan.records[k].node]) for k in records}


def wait_records(refs: dict[str, Any]) -> dict[str, str]:
    """Wait for every record task; record key -> error of those that failed (their node's, when it failed)."""
    failed: dict[str, str] = {}
    for key, ref in refs.items():
        try:
            ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the record or the node it evaluates failed: said per record
            cause = getattr(e, "cause", None) or e
            lines = str(getattr(cause, "message", "") or cause).strip().splitlines()
            failed[key] = lines[-1] if lines else type(e).__name__
    return failed
