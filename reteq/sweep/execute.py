"""Execute the plan as the DAG it is: stage nodes as Ray tasks chained by object refs, leaves as Tune trials.

Why this shape (issue 11): the plan is static, so every missing node is submitted up front
(`nodes.submit_nodes`) and Ray itself starts a node when its parent's ref resolves; nothing waits holding a
CPU or GPU, and no registry actor or polling is needed (an earlier design had trials train their path's nodes
and wait on each other through a registry actor: waiters held their resources and hung when an owner died).
Failures travel through the same refs: a node that fails after its retries fails exactly the tasks and leaves
below it. Leaves are Tune trials over named axes, handed out by `dag.DagSearcher` only once their nodes are
published; Tune keeps its table, its `FailureConfig(max_failures)` retries and its ResultGrid. Ray tasks
rather than long-lived actors for nodes: a task's retry is Ray's (a dead worker process re-runs the task), its
result is an object ref other tasks can depend on, and it holds nothing once done.

One CPU worker with ZeRO-0 (the demo, the tests) runs each node and leaf in its task / trial process with
plain torch: a TorchTrainer's worker group, process group and `import deepspeed` cost 14-24 s per run on 2
cores, more than a demo node's training (docs/benchmarks.md). Multi-worker and GPU runs keep one TorchTrainer
(DeepSpeed) per node and per leaf, with Train's FailureConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
from ray import tune

from reteq import environment
from reteq.config import SweepConfig
from reteq.sweep.dag import ConsoleLines, DagSearcher, NodeWatch
from reteq.sweep.leaves import AXES, axes, leaf_trial
from reteq.sweep.nodes import needed_nodes, submit_nodes
from reteq.sweep.ray_session import TRIAL_DRIVER_CPUS
from reteq.sweep.retrain_records import record_nodes, submit_records, wait_records
from reteq.sweep.settings import SweepRun


@dataclass
class DagOutcome:
    results: Any = None  # Tune's ResultGrid (None when no leaf was left to run)
    failed_nodes: dict[str, str] = field(default_factory=dict)  # key of the node that failed -> error
    skipped_leaves: list[str] = field(default_factory=list)  # leaf keys never started: a node they need failed
    failed_leaves: int = 0  # trials that errored after Tune's retries
    node_infos: dict[str, dict] = field(default_factory=dict)  # key -> {path, run_id, started, published}
    failed_records: dict[str, str] = field(default_factory=dict)  # retrain record key -> error

    @property
    def ok(self) -> bool:
        return not (self.failed_nodes or self.skipped_leaves or self.failed_leaves or self.failed_records)


def run_dag(cfg: SweepConfig, plan, todo: list, settings: SweepRun, done_nodes: dict[str, dict],
            records: list[str] = (), launcher=None) -> DagOutcome:
    """Submit the missing nodes, run the leaves in `todo` as Tune trials and the missing retrain `records` as
    tasks (reteq.sweep.retrain_records), return what happened. Nodes and records are submitted by `launcher`
    (a launcher.Launcher) when given, so that they share warm workers with the leaves."""
    keys = list(dict.fromkeys(needed_nodes(plan, todo) + record_nodes(plan, list(records))))  # parents first
    settings_ref = ray.put(settings)
    if launcher is not None:
        refs, record_refs = ray.get(launcher.submit.remote(settings, keys, [settings_ref], done_nodes, list(records)))
    else:
        refs = submit_nodes(cfg, plan, keys, settings_ref, done_nodes, settings)
        record_refs = submit_records(cfg, plan, list(records), settings_ref, refs, settings)
    watch = NodeWatch(plan, refs, {k for k in keys if k in done_nodes}, echo=lambda m: print(m, flush=True))
    searcher = DagSearcher(todo, watch)
    grid = _tune_leaves(cfg, todo, settings, refs, watch, searcher) if todo else []
    ray.wait(list(refs.values()), num_returns=len(refs))  # every node a leaf needed resolved before it ran
    failed_records = wait_records(record_refs)
    watch.poll(force=True)
    roots = {root: msg for root, msg in watch.failed.values()}
    return DagOutcome(results=grid if todo else None, failed_nodes=roots, skipped_leaves=list(searcher.skipped),
                      failed_leaves=sum(1 for r in grid if r.error is not None), node_infos=watch.published,
                      failed_records={k: m for k, m in failed_records.items() if plan.records[k].node not in
                                      watch.failed})


def _tune_leaves(cfg: SweepConfig, todo: list, settings: SweepRun, refs: dict[str, Any], watch, searcher):
    """The leaves as Tune trials (handed out by `searcher` once their nodes are published); Tune's ResultGrid."""
    trainable = tune.with_resources(tune.with_parameters(leaf_trial, settings=settings, parents=refs),
                                    {"cpu": TRIAL_DRIVER_CPUS})
    ex = cfg.execution
    space = {k: tune.choice(vals) for k, vals in _axis_values(todo).items()}  # names the axes for Tune's table
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(todo),
                                    max_concurrent_trials=ex.max_concurrent_trials, reuse_actors=True),
        run_config=tune.RunConfig(name=f"{cfg.name}-tune", storage_path=settings.storage_path, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=ex.max_failures),
                                  callbacks=[ConsoleLines(watch, len(todo))]),
    )
    return tuner.fit()


def _axis_values(leaves: list) -> dict[str, list]:
    out: dict[str, list] = {k: [] for k in AXES}
    for leaf in leaves:
        for k, v in axes(leaf).items():
            if v not in out[k]:
                out[k].append(v)
    return out


def check_resources(cfg: SweepConfig) -> None:
    """Fail fast when a node or trial can never be scheduled (Ray would leave it PENDING forever)."""
    total = ray.cluster_resources()
    ex = cfg.execution
    need_cpu = ex.workers * ex.cpus_per_worker + (0 if ex.workers == 1 and not ex.use_gpu else TRIAL_DRIVER_CPUS)
    if not ex.use_gpu and total.get("CPU", 0) < need_cpu:
        raise RuntimeError(f"execution: a node or trial needs {need_cpu:g} CPUs ({ex.workers} workers x "
                           f"{ex.cpus_per_worker:g}), the cluster has {total.get('CPU', 0):g}")
    if ex.use_gpu and total.get("GPU", 0) < ex.workers * ex.gpus_per_worker and not environment.autoscaling():
        raise RuntimeError(f"execution: a trial needs {ex.workers * ex.gpus_per_worker:g} GPUs, the cluster has "
                           f"{total.get('GPU', 0):g} (and no autoscaler)")

