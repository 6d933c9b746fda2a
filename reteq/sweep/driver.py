"""The driver of one sweep attempt, run while its process holds the work dir (reteq.sweep.lock).

setup (MLflow experiment + parent run, close what an earlier attempt left RUNNING, repair the local store, find
finished work) -> run (`run_dag`: the missing stage nodes as Ray tasks, the leaves not yet done as Tune trials)
-> close (every run of this attempt ends, the parent says FINISHED or FAILED). Ray is started by `RaySession` at most once, beside the MLflow setup when the store is new (it is certainly needed).
`reteq sweep` (reteq.commands.sweep) validates the config, takes the lock, calls `run_locked` and writes the
report.

`run_dag` executes the plan as the DAG it is: stage nodes as Ray tasks chained by object refs, leaves as Tune
trials.

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

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from reteq import environment
from reteq import tracking as T
from reteq.config import SweepConfig
from reteq.mlflow_store import ensure_experiment, tracking_client
from reteq.redact import redact, tracking_credentials
from reteq.resources import ResourceError, describe, full_disk, one_line, writing
from reteq.sweep import lifecycle, record, remote
from reteq.sweep.dag import ConsoleLines, DagSearcher, NodeWatch
from reteq.sweep.lock import ExperimentLease
from reteq.sweep.nodes import leaf_dependencies, needed_nodes
from reteq.sweep.process import in_process
from reteq.sweep.ray_session import TRIAL_DRIVER_CPUS, init_ray, task_cpus, trial_runtime_env, workers_to_keep
from reteq.sweep.repair import RecordTarget, reconcile_nodes
from reteq.sweep.retrain_records import record_nodes
from reteq.sweep.settings import SweepRun
from reteq.train.deepspeed_config import load_deepspeed_config


@dataclass
class SweepOutcome:
    code: int  # 0: every node and leaf finished; 1: some failed (named on the console)
    dag: DagOutcome | None = None  # None when nothing was left to run
    phases: dict[str, float] | None = None  # seconds since the sweep started when each driver phase ended
    tracking_uri: str = ""  # where the sweep recorded (the report reads it)


def run_locked(cfg: SweepConfig, plan, work: Path) -> SweepOutcome:
    """The sweep itself, run while this process holds the work dir and, in the tracking store, the experiment's
    lease (reteq.sweep.lock.ExperimentLease; a live sweep from another work dir stops this one, exit 2, before
    anything is touched): every RUNNING run of an earlier attempt is dead, so it is closed first; the local store
    is repaired and recorded before any trial uses it. The report is the caller's (reteq.commands.sweep)."""
    lease: list[ExperimentLease] = []
    try:
        return _run_leased(cfg, plan, work, lease)
    finally:
        for held in lease:
            held.release()


def _run_leased(cfg: SweepConfig, plan, work: Path, lease: list) -> SweepOutcome:
    start = time.perf_counter()
    phases: dict[str, float] = {}

    def mark(phase: str) -> None:
        phases[phase] = round(time.perf_counter() - start, 2)

    uri, credentials = tracking_credentials(cfg.execution.tracking_uri or T.default_tracking_uri(work))
    environment.export_tracking_credentials(credentials)  # MLflow sends them as basic auth; the URI holds none
    store = uri.removeprefix("sqlite:///")
    attempt = lifecycle.new_attempt()

    def mlflow_setup():
        with writing("the MLflow store", store):
            exp_id = ensure_experiment(uri, cfg.name, T.default_artifact_root(work))
            c = tracking_client(uri)
            lease.append(ExperimentLease(uri, cfg.name, work, attempt).acquire(c, exp_id))
            parent = record.parent_run(c, exp_id, cfg.name, cfg.digest())
            c.set_tag(parent, T.TAG_ATTEMPT, attempt)
            record.log_sweep_config(c, parent, cfg)
            return c, exp_id, parent, lifecycle.close_stale_runs(c, exp_id, cfg.name, attempt)

    # A store not made yet holds no finished work, so Ray is certainly needed: start it (main thread: Ray's
    # processes die with the thread that started them) while a thread sets up MLflow, and warm the task workers.
    session = RaySession(cfg, mark)
    fresh = uri.startswith("sqlite:///") and not Path(store).exists()
    with ThreadPoolExecutor(1, thread_name_prefix="mlflow-setup") as pool:
        setup = pool.submit(mlflow_setup)
        try:
            if fresh:
                session.start()
            c, exp_id, parent, closed = setup.result()
        except BaseException:
            session.stop()
            raise
    mark("mlflow_setup")
    if closed:
        print(f"closed {closed} run(s) left RUNNING by an earlier attempt that died (now KILLED)", flush=True)
    dag = None
    try:
        for again in (False, True):  # a second round only when the first found corrupt artifacts (below)
            before, dag = _round(cfg, plan, work, session, Attempt(c, exp_id, parent, uri, attempt), mark)
            lost = sorted(set(before) - set(record.finished_nodes(c, exp_id)))
            if dag is None or again or not lost:
                break
            # a trial fetched a node's artifact, found it failing sha256 and marked its run (reteq.sweep.delivery):
            # no machine had a verified copy, so the node is retrained once and the leaves below it run again
            print(f"{len(lost)} node checkpoint(s) failed sha256 in MLflow's artifact store and no machine had a "
                  f"verified copy ({', '.join(k[:8] for k in lost)}): retraining them, then their leaves", flush=True)
    except BaseException as e:
        session.stop()
        full = full_disk(work) if isinstance(e, Exception) and describe(e) is None else None
        reason = f"the sweep driver failed: {full or one_line(e)}"
        try:  # best effort: on a full or read-only disk the record may not take these writes either
            lifecycle.close_attempt_runs(c, exp_id, attempt, reason)
            record.record_failed_children(c, exp_id, parent, attempt)
            lifecycle.finish_run(c, parent, T.STATUS_FAILED, reason)
        except Exception as close_error:  # noqa: BLE001
            if full is None:
                print(f"could not close this attempt's runs: {type(close_error).__name__}", file=sys.stderr)
        if full is not None:  # what broke is the disk, whatever a library made of it (Tune: a JSON-decode error)
            raise ResourceError(full) from e
        raise
    session.stop()
    with writing("the MLflow store", store):
        lifecycle.close_attempt_runs(c, exp_id, attempt, "its trial ended without closing it")
        children = record.record_failed_children(c, exp_id, parent, attempt)
        ok = dag is None or dag.ok
        mark("close")
        record.log_phases(c, parent, phases)
        c.set_terminated(parent, "FINISHED" if ok else "FAILED")
    print(f"sweep {cfg.name} finished in {time.perf_counter() - start:.0f}s; {children} failed or killed runs"
          + ("" if ok else "; FAILED:"))
    if not ok:
        print_failures(plan, dag)
    print(f"MLflow: {redact(uri)} (experiment '{cfg.name}'); browse with: reteq ui --work-dir {work}")
    return SweepOutcome(0 if ok else 1, dag, phases, uri)


@dataclass(frozen=True)
class Attempt:
    """Where this attempt records: the MLflow client, experiment, parent run, tracking URI, and its own id."""

    c: Any
    exp_id: str
    parent: str
    uri: str
    attempt: str


def _round(cfg: SweepConfig, plan, work: Path, session: RaySession, rec: Attempt, mark
           ) -> tuple[dict[str, dict], DagOutcome | None]:
    """Find what is left (MLflow is the record), repair the local store, run the rest -> (the nodes that counted
    as finished when it started, what the DAG did: None when nothing was left)."""
    c, exp_id, parent, uri, attempt = rec.c, rec.exp_id, rec.parent, rec.uri, rec.attempt
    done_leaves = record.finished_leaves(c, exp_id)
    todo = [leaf for leaf in plan.leaves if leaf.key not in done_leaves]
    records = [k for k in plan.records if k not in record.finished_records(c, exp_id)]  # theta_r evaluated
    needed = {n.key for leaf in todo for dep in leaf_dependencies(leaf) for n in plan.chain(dep)}
    needed |= {n.key for k in records for n in plan.chain(plan.records[k].node)}
    reconcile_nodes(RecordTarget(c, exp_id, parent, attempt), work / "checkpoints", plan.nodes,
                    lambda n: record.node_tags(n, cfg.name, n.schedule or cfg.stage(n.stage).schedule),
                    needed, echo=lambda m: print(m, flush=True))
    done_nodes = record.finished_nodes(c, exp_id)
    mark("resume_lookup")
    summary = plan.summary()
    print(f"sweep {cfg.name}: {summary['stage_nodes']} stage nodes ({summary['stage_runs_without_sharing']} "
          f"without sharing), {summary['unlearn_runs']} unlearning runs; already done: "
          f"{sum(k in done_nodes for k in plan.nodes)} nodes, {len(plan.leaves) - len(todo)} runs"
          + (f", {len(plan.records) - len(records)} of {len(plan.records)} retrain records" if plan.records
             else ""), flush=True)
    if not (todo or records):
        print("nothing to do: every node and unlearning run is already recorded in MLflow", flush=True)
        return done_nodes, None
    environment.mark_fault_driver()
    session.start()
    check_resources(cfg)
    secrets = environment.export_tracking_credentials({})
    settings = SweepRun(
        config=cfg.model_dump(mode="json"), config_name=str(cfg.name), digest=cfg.digest(),
        env=environment.worker_env(), attempt=attempt, tracking_uri=uri, experiment_id=exp_id,
        parent_run_id=parent, checkpoints=str(work / "checkpoints"),
        storage_path=cfg.execution.storage_path or str(work / "ray"), secrets=remote.put(secrets) if secrets else None,
        deepspeed=str(Path(cfg.execution.deepspeed).resolve()) if cfg.execution.deepspeed else None,
        in_process=session.in_process, task_cpus=session.task_cpus,
        runtime_env=trial_runtime_env(),  # on the driver: a trial's env holds Tune's own variables
    )
    dag = run_dag(cfg, plan, todo, settings, done_nodes, records, session.launcher and session.launcher[0])
    mark("dag")
    print_resource_errors([r.error for r in dag.results or [] if r.error is not None])
    return done_nodes, dag


def keep_workers(cfg: SweepConfig) -> int:
    """Idle Ray workers a local cluster started for this sweep keeps (ray_session.workers_to_keep)."""
    return workers_to_keep(cfg.execution.cpus_per_worker, cfg.execution.max_concurrent_trials)


class RaySession:
    """Ray for one sweep: started at most once (with warm task workers for in-process nodes and leaves), and
    shut down at the end only when this sweep started it."""

    def __init__(self, cfg: SweepConfig, mark):
        self.cfg, self.mark = cfg, mark
        self.up = self.owned = False
        self.launcher = None  # (actor, placement group) for in-process nodes and leaves
        self.task_cpus = cfg.execution.cpus_per_worker  # what an in-process task asks for (set once Ray is up)
        ex = cfg.execution
        # decided once, here: the launcher, the node tasks and the leaves all follow it (SweepRun.in_process)
        self.in_process = in_process(cfg, load_deepspeed_config(ex.deepspeed) if ex.deepspeed else None)

    def start(self) -> None:
        if self.up:
            return
        self.owned, self.up = init_ray(keep_workers(self.cfg)), True
        ex = self.cfg.execution
        if self.in_process:
            self.task_cpus = task_cpus(ex.cpus_per_worker, ex.max_concurrent_trials,
                                       ray.cluster_resources().get("CPU", 0))
            self.launcher = remote.start_launcher(self.task_cpus, ex.worker_resources)  # its workers warming
        self.mark("ray_start")

    def stop(self) -> None:
        if self.up and not self.owned:  # a cluster someone else started: leave nothing of this sweep behind
            remote.stop_launcher(self.launcher)
        self.launcher = None
        if self.owned:
            self.shutdown(True)
            self.mark("ray_stop")
        self.up = self.owned = False

    @staticmethod
    def shutdown(owned: bool) -> None:
        if owned:
            ray.shutdown()


def print_failures(plan, dag: DagOutcome) -> None:
    for key, msg in dag.failed_nodes.items():
        node = plan.nodes.get(key)
        what = f"{node.model} {T.order_tag(node.prefix)}" if node else ""
        print(f"  node {key[:8]} {what} failed: {msg}")
    if dag.skipped_leaves:
        print(f"  {len(dag.skipped_leaves)} unlearning run(s) skipped below the failed node(s)")
    if dag.failed_leaves:
        print(f"  {dag.failed_leaves} unlearning trial(s) failed after Ray Tune's retries")
    for msg in dag.failed_records.values():
        print(f"  {msg}")


def print_resource_errors(errors: list) -> None:
    """A trial that died of a full or read-only disk: one line each (the path and what it was writing)."""
    for line in dict.fromkeys(filter(None, (describe(str(e)) for e in errors))):
        print(f"error: {line}", file=sys.stderr, flush=True)


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
    (a remote.Launcher) when given, so that they share warm workers with the leaves."""
    keys = list(dict.fromkeys(needed_nodes(plan, todo) + record_nodes(plan, list(records))))  # parents first
    refs, record_refs = remote.submit(cfg, plan, settings, keys, done_nodes, list(records), launcher)
    watch = NodeWatch(plan, refs, {k for k in keys if k in done_nodes}, echo=lambda m: print(m, flush=True))
    searcher = DagSearcher(todo, watch)
    grid = remote.tune_leaves(cfg, todo, settings, refs, searcher, [ConsoleLines(watch, len(todo))]) if todo else []
    remote.wait_all(refs)  # every node a leaf needed resolved before it ran
    failed_records = remote.wait_records(record_refs)
    watch.poll(force=True)
    roots = {root: msg for root, msg in watch.failed.values()}
    return DagOutcome(results=grid if todo else None, failed_nodes=roots, skipped_leaves=list(searcher.skipped),
                      failed_leaves=sum(1 for r in grid if r.error is not None), node_infos=watch.published,
                      failed_records={k: m for k, m in failed_records.items() if plan.records[k].node not in
                                      watch.failed})


def check_resources(cfg: SweepConfig) -> None:
    """Fail fast when a node or trial can never be scheduled (Ray would leave it PENDING forever). A cluster
    joined by address may be an autoscaler's, which starts with no workers (its head may have no CPU for a task):
    there the check is `--cluster FILE` against its node types (reteq.sweep.cluster_fit), before Ray starts."""
    total = ray.cluster_resources()
    ex = cfg.execution
    need_cpu = ex.workers * ex.cpus_per_worker + (0 if ex.workers == 1 and not ex.use_gpu else TRIAL_DRIVER_CPUS)
    if not ex.use_gpu and total.get("CPU", 0) < need_cpu and not environment.autoscaling():
        raise RuntimeError(f"execution: a node or trial needs {need_cpu:g} CPUs ({ex.workers} workers x "
                           f"{ex.cpus_per_worker:g}), the cluster has {total.get('CPU', 0):g}")
    if ex.use_gpu and total.get("GPU", 0) < ex.workers * ex.gpus_per_worker and not environment.autoscaling():
        raise RuntimeError(f"execution: a trial needs {ex.workers * ex.gpus_per_worker:g} GPUs, the cluster has "
                           f"{total.get('GPU', 0):g} (and no autoscaler)")
