"""theta_r's records: one evaluation per retrain node, once its checkpoint is published (its Ray task is
reteq.sweep.remote.record_task).

Why a task of its own rather than part of a node or a leaf: a node already published by an earlier attempt (or by
a sweep from before records existed) still needs its record, and several leaves share one theta_r, so no leaf
owns it. Like a node task, a record task names its node's ref as an argument: Ray starts it when the node is
published, and a failed node fails it without running. It evaluates in its own process (the eval metrics of an
unlearning run's step 0), logs one MLflow run of kind "retrain" keyed by the record key, and trains nothing.
Its run is closed FAILED on an exception, and KILLED by the next attempt if its process dies (reteq.sweep.lifecycle).
"""

from __future__ import annotations

from typing import Any

from reteq import tracking as T
from reteq.errors import NodeFailed
from reteq.resources import one_line
from reteq.sweep import process
from reteq.sweep.rank import Rank, rank_run
from reteq.sweep.settings import SweepRun


def evaluate_record(settings: SweepRun, key: str, node: dict) -> dict[str, Any]:
    """Evaluate theta_r (`node`: its published checkpoint {key, path, run_id}) and log its retrain record."""
    # lazy: keeps torch out of the light processes (driver, Tune trials, the CLI)
    from reteq.pipeline.leaf import record_retrain

    _, plan = process.plan_of(settings)
    rec = plan.records[key]
    try:
        with rank_run(settings, key, rec.model, Rank()) as run:  # one process: the task's own GPU or the CPU
            path = run.store.ensure_local(rec.node, run.worker)
            record_retrain(run, rec, path, node.get("run_id", ""))
    except Exception as e:
        raise NodeFailed(key, f"retrain record {key[:8]} ({rec.model} {T.order_tag(rec.order)}) failed: "
                              f"{one_line(e)}") from e
    return {"key": key, "run_id": run.hooks.run_id(key)}


def record_nodes(plan, records: list[str]) -> list[str]:
    """The nodes the records need (each theta_r and its ancestors), parents first."""
    return list(dict.fromkeys(n.key for k in records for n in plan.chain(plan.records[k].node)))


def task_options(cfg, settings: SweepRun) -> dict[str, Any]:
    """A record task's Ray options. `settings` is the driver's: its runtime env (ray_session.trial_runtime_env)
    and a task's CPU request (ray_session.task_cpus)."""
    ex = cfg.execution
    opts: dict[str, Any] = {"num_cpus": settings.task_cpus, "max_retries": ex.max_failures,
                            "retry_exceptions": False, "runtime_env": settings.runtime_env,
                            "scheduling_strategy": "DEFAULT",  # the warm workers of nodes and leaves (Launcher)
                            "resources": dict(ex.worker_resources)}  # it evaluates in this task: a worker's place
    if ex.use_gpu:
        opts["num_gpus"] = ex.gpus_per_worker
    return opts


def failure_line(e: BaseException) -> str:
    """The last line of a failed record task's error (its node's, when the node failed)."""
    cause = getattr(e, "cause", None) or e
    lines = str(getattr(cause, "message", "") or cause).strip().splitlines()
    return lines[-1] if lines else type(e).__name__
