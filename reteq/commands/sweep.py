"""`reteq sweep` and `reteq demo`: the driver side of a Ray sweep.

setup (validate, preflight data and models, MLflow experiment + parent run, find finished work)
-> run (the missing stage nodes as Ray tasks, the leaves not yet done as Tune trials) -> report (where the MLflow UI and report.html are).
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from reteq import environment
from reteq import tracking as T
from reteq.commands.report import write_sweep_report
from reteq.config import SweepConfig, load_config
from reteq.errors import BadInput
from reteq.sweep.execute import DagOutcome
from reteq.sweep.mlflow_store import restore_tracking_uri
from reteq.workdir import resolve_work_dir


def default_demo_config() -> Path:
    """configs/demo.yaml of this checkout: the embedded default of `reteq demo`."""
    return Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@dataclass
class SweepOutcome:
    code: int  # 0: every node and leaf finished; 1: some failed (named on the console)
    dag: DagOutcome | None = None  # None when nothing was left to run
    phases: dict[str, float] | None = None  # seconds since the sweep started when each driver phase ended


def sweep_command(cfg: SweepConfig, work_dir: str | None = None, report: bool = True) -> int:
    return run_sweep(cfg, work_dir, report).code


def run_sweep(cfg: SweepConfig, work_dir: str | None = None, report: bool = True) -> SweepOutcome:
    from reteq.commands.resources import writing
    from reteq.sweep.lock import WorkDirLock

    plan = _preflight(cfg)  # bad input fails here, before the work dir exists
    work = resolve_work_dir(work_dir or cfg.work_dir)
    with writing("the work dir", work):
        work.mkdir(parents=True, exist_ok=True)
    with writing("the work dir lock", work / "sweep.lock"):
        lock = WorkDirLock(work).acquire()  # a second sweep on this work dir stops here (exit 2)
    uri_before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        return _sweep_locked(cfg, plan, work, report)
    finally:
        lock.release()
        restore_tracking_uri(uri_before)


def _preflight(cfg: SweepConfig):
    from reteq.pipeline import DataCache, preflight
    from reteq.plan import build_plan
    from reteq.train.engine import load_deepspeed_config

    plan = build_plan(cfg)
    preflight(cfg, DataCache(cfg), report=lambda line: print(f"preflight: {line}", flush=True))  # bad input fails here
    if cfg.execution.deepspeed:
        load_deepspeed_config(cfg.execution.deepspeed)  # missing or not JSON: one line, before Ray starts
    if cfg.execution.workers > 1 and not cfg.execution.deepspeed:
        raise BadInput("execution.workers > 1 needs execution.deepspeed (data parallelism runs through it)")
    return plan


def _sweep_locked(cfg: SweepConfig, plan, work: Path, report: bool) -> SweepOutcome:
    """The sweep itself, run while this process holds the work dir: every RUNNING run of an earlier attempt is
    dead, so it is closed first; the local store is repaired and recorded before any trial uses it."""
    from reteq.commands.resources import writing
    from reteq.sweep import faults, lifecycle, record
    from reteq.sweep.execute import check_resources, run_dag
    from reteq.sweep.mlflow_store import ensure_experiment, tracking_client
    from reteq.sweep.nodes import leaf_dependencies
    from reteq.sweep.ray_session import trial_runtime_env
    from reteq.sweep.repair import reconcile_nodes

    start = time.perf_counter()
    phases: dict[str, float] = {}

    def mark(phase: str) -> None:
        phases[phase] = round(time.perf_counter() - start, 2)

    uri = cfg.execution.tracking_uri or T.default_tracking_uri(work)
    store = uri.removeprefix("sqlite:///")
    attempt = lifecycle.new_attempt()

    def mlflow_setup():
        with writing("the MLflow store", store):
            exp_id = ensure_experiment(uri, cfg.name, T.default_artifact_root(work))
            c = tracking_client(uri)
            parent = record.parent_run(c, exp_id, cfg.name, cfg.digest())
            c.set_tag(parent, T.TAG_ATTEMPT, attempt)
            record.log_sweep_config(c, parent, cfg)
            return c, exp_id, parent, lifecycle.close_stale_runs(c, exp_id, cfg.name, attempt)

    # A store not made yet holds no finished work, so Ray is certainly needed: start it (main thread: Ray's
    # processes die with the thread that started them) while a thread sets up MLflow, and warm the task workers.
    session = _RaySession(cfg, mark)
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
        done_leaves = record.finished_leaves(c, exp_id)
        todo = [leaf for leaf in plan.leaves if leaf.key not in done_leaves]
        records = [k for k in plan.records if k not in record.finished_records(c, exp_id)]  # theta_r evaluated
        needed = {n.key for leaf in todo for dep in leaf_dependencies(leaf) for n in plan.chain(dep)}
        needed |= {n.key for k in records for n in plan.chain(plan.records[k].node)}
        reconcile_nodes(c, exp_id, parent, work / "checkpoints", plan.nodes,
                        lambda n: record.node_tags(n, cfg.name, n.schedule or cfg.stage(n.stage).schedule),
                        attempt, needed, echo=lambda m: print(m, flush=True))
        done_nodes = record.finished_nodes(c, exp_id)
        mark("resume_lookup")
        summary = plan.summary()
        print(f"sweep {cfg.name}: {summary['stage_nodes']} stage nodes ({summary['stage_runs_without_sharing']} "
              f"without sharing), {summary['unlearn_runs']} unlearning runs; already done: "
              f"{sum(k in done_nodes for k in plan.nodes)} nodes, {len(plan.leaves) - len(todo)} runs"
              + (f", {len(plan.records) - len(records)} of {len(plan.records)} retrain records" if plan.records
                 else ""), flush=True)
        if todo or records:
            environment.mark_fault_driver()
            session.start()
            check_resources(cfg)
            base = {
                "config": cfg.model_dump(mode="json"), "config_name": str(cfg.name), "digest": cfg.digest(),
                "env": environment.worker_env(), "attempt": attempt,
                "tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent,
                "checkpoints": str(work / "checkpoints"),
                "storage_path": cfg.execution.storage_path or str(work / "ray"),
                "deepspeed": str(Path(cfg.execution.deepspeed).resolve()) if cfg.execution.deepspeed else None,
                "in_process": session.in_process,
                "task_cpus": session.task_cpus,  # an in-process task's CPU request (ray_session.task_cpus)
                "runtime_env": trial_runtime_env(),  # on the driver: a trial's env holds Tune's own variables
            }
            dag = run_dag(cfg, plan, todo, base, done_nodes, records, session.launcher and session.launcher[0])
            mark("dag")
            _print_resource_errors([r.error for r in dag.results or [] if r.error is not None])
        else:
            print("nothing to do: every node and unlearning run is already recorded in MLflow", flush=True)
    except BaseException as e:
        session.stop()
        reason = f"the sweep driver failed: {type(e).__name__}: {e}"
        try:  # best effort: on a full or read-only disk the record may not take these writes either
            lifecycle.close_attempt_runs(c, exp_id, attempt, reason)
            lifecycle.record_failed_children(c, exp_id, parent, attempt)
            lifecycle.finish_run(c, parent, T.STATUS_FAILED, reason)
        except Exception as close_error:  # noqa: BLE001
            print(f"could not close this attempt's runs: {type(close_error).__name__}", file=sys.stderr)
        raise
    session.stop()
    with writing("the MLflow store", store):
        lifecycle.close_attempt_runs(c, exp_id, attempt, "its trial ended without closing it")
        children = lifecycle.record_failed_children(c, exp_id, parent, attempt)
        ok = dag is None or dag.ok
        mark("close")
        record.log_phases(c, parent, phases)
        c.set_terminated(parent, "FINISHED" if ok else "FAILED")
    print(f"sweep {cfg.name} finished in {time.perf_counter() - start:.0f}s; {children} failed or killed runs"
          + ("" if ok else "; FAILED:"))
    if not ok:
        _print_failures(plan, dag)
    print(f"MLflow: {uri} (experiment '{cfg.name}'); browse with: reteq ui --work-dir {work}")
    if report:
        with writing("the report", work / "report"):
            faults.fault("report")  # every run is closed; only the report is left to write
            out = write_sweep_report(cfg, uri, work)
        if out:
            print(f"report: {out}")
    return SweepOutcome(0 if ok else 1, dag, phases)


def _workers_to_keep(cfg: SweepConfig) -> int:
    from reteq.sweep.ray_session import workers_to_keep

    return workers_to_keep(cfg.execution.cpus_per_worker, cfg.execution.max_concurrent_trials)


class _RaySession:
    """Ray for one sweep: started at most once (with warm task workers for in-process nodes and leaves), and
    shut down at the end only when this sweep started it."""

    def __init__(self, cfg: SweepConfig, mark):
        from reteq.sweep.worker import in_process
        from reteq.train.engine import load_deepspeed_config

        self.cfg, self.mark = cfg, mark
        self.up = self.owned = False
        self.launcher = None  # (actor, placement group) for in-process nodes and leaves
        self.task_cpus = cfg.execution.cpus_per_worker  # what an in-process task asks for (set once Ray is up)
        ex = cfg.execution
        # decided once, here: the launcher, the node tasks and the leaves all follow it (base["in_process"])
        self.in_process = in_process(cfg, load_deepspeed_config(ex.deepspeed) if ex.deepspeed else None)

    def start(self) -> None:
        from reteq.sweep.launcher import start_launcher
        from reteq.sweep.ray_session import init_ray, task_cpus, trial_runtime_env

        if self.up:
            return
        self.owned, self.up = init_ray(_workers_to_keep(self.cfg)), True
        ex = self.cfg.execution
        if self.in_process:
            import ray

            self.task_cpus = task_cpus(ex.cpus_per_worker, ex.max_concurrent_trials,
                                       ray.cluster_resources().get("CPU", 0))
            self.launcher = start_launcher()
            self.launcher[0].warm.remote(self.task_cpus, trial_runtime_env())
        self.mark("ray_start")

    def stop(self) -> None:
        from reteq.sweep.launcher import stop_launcher

        if self.up and not self.owned:  # a cluster someone else started: leave nothing of this sweep behind
            stop_launcher(self.launcher)
        self.launcher = None
        if self.owned:
            self.shutdown(True)
            self.mark("ray_stop")
        self.up = self.owned = False

    @staticmethod
    def shutdown(owned: bool) -> None:
        if owned:
            import ray

            ray.shutdown()


def _print_failures(plan, dag: DagOutcome) -> None:
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


def _print_resource_errors(errors: list) -> None:
    """A trial that died of a full or read-only disk: one line each (the path and what it was writing)."""
    from reteq.commands.resources import describe

    for line in dict.fromkeys(filter(None, (describe(str(e)) for e in errors))):
        print(f"error: {line}", file=sys.stderr, flush=True)


def demo_command(config: str | None, work_dir: str | None) -> int:
    """The embedded default end to end: sweep (tiny model, p = 1..4, GA/NPO/SimNPO), theory, report."""
    from reteq.commands.theory import theory_command
    from reteq.sweep.ray_session import init_ray

    t0 = time.perf_counter()
    cfg = load_config(config or default_demo_config())
    work = resolve_work_dir(work_dir or cfg.work_dir)
    owned = init_ray(_workers_to_keep(cfg))  # one Ray session for both parts
    try:
        theory_command(None, str(work), False)  # same MLflow store: one UI, one report
        code = sweep_command(cfg, str(work), report=True)
    finally:
        _RaySession.shutdown(owned)
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    print(f"open {work / 'report' / 'report.html'} in a browser; MLflow UI: reteq ui --work-dir {work}")
    return code
