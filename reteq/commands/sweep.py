"""`reteq sweep` and `reteq demo`: the driver side of a Ray sweep.

setup (validate, preflight data and models, MLflow experiment + parent run, find finished work)
-> run (Ray Tune trials for the leaves not yet done) -> report (where the MLflow UI and report.html are).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from reteq import tracking as T
from reteq.commands.report import write_sweep_report
from reteq.config import SweepConfig, load_config
from reteq.errors import BadInput
from reteq.workdir import resolve_work_dir


def default_demo_config() -> Path:
    """configs/demo.yaml of this checkout: the embedded default of `reteq demo`."""
    return Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _init_ray() -> bool:
    """Connect to RAY_ADDRESS (or a job's cluster) if there is one, else start a local cluster on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")  # read by Train controllers
    kwargs = {"log_to_driver": True, "include_dashboard": False}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**{k: v for k, v in kwargs.items() if k != "include_dashboard"})
    else:
        ray.init(_node_ip_address="127.0.0.1", **kwargs)
    return True


def sweep_command(cfg: SweepConfig, work_dir: str | None = None, report: bool = True) -> int:
    from reteq.commands.resources import writing
    from reteq.sweep.lock import WorkDirLock

    plan = _preflight(cfg)  # bad input fails here, before the work dir exists
    work = resolve_work_dir(work_dir or cfg.work_dir)
    with writing("the work dir", work):
        work.mkdir(parents=True, exist_ok=True)
    with writing("the work dir lock", work / "sweep.lock"):
        lock = WorkDirLock(work).acquire()  # a second sweep on this work dir stops here (exit 2)
    try:
        return _sweep_locked(cfg, plan, work, report)
    finally:
        lock.release()


def _preflight(cfg: SweepConfig):
    from reteq.pipeline import DataCache, preflight
    from reteq.plan import build_plan
    from reteq.train.engine import load_deepspeed_config

    plan = build_plan(cfg)
    preflight(cfg, DataCache(cfg))  # bad data or model paths fail here, before anything trains
    if cfg.execution.deepspeed:
        load_deepspeed_config(cfg.execution.deepspeed)  # missing or not JSON: one line, before Ray starts
    if cfg.execution.workers > 1 and not cfg.execution.deepspeed:
        raise BadInput("execution.workers > 1 needs execution.deepspeed (data parallelism runs through it)")
    return plan


def _sweep_locked(cfg: SweepConfig, plan, work: Path, report: bool) -> int:
    """The sweep itself, run while this process holds the work dir: every RUNNING run of an earlier attempt is
    dead, so it is closed first; the local store is repaired and recorded before any trial uses it."""
    from reteq.commands.resources import writing
    from reteq.plan import leaf_to_dict
    from reteq.sweep import faults, lifecycle, record
    from reteq.sweep.execute import check_resources, run_trials, worker_env
    from reteq.sweep.mlflow_store import ensure_experiment, tracking_client
    from reteq.sweep.repair import reconcile_nodes

    start = time.perf_counter()
    uri = cfg.execution.tracking_uri or T.default_tracking_uri(work)
    store = uri.removeprefix("sqlite:///")
    attempt = lifecycle.new_attempt()
    with writing("the MLflow store", store):
        exp_id = ensure_experiment(uri, cfg.name, T.default_artifact_root(work))
        c = tracking_client(uri)
        parent = record.parent_run(c, exp_id, cfg.name, cfg.digest())
        c.set_tag(parent, T.TAG_ATTEMPT, attempt)
        record.log_sweep_config(c, parent, cfg)
        closed = lifecycle.close_stale_runs(c, exp_id, cfg.name, attempt)
    if closed:
        print(f"closed {closed} run(s) left RUNNING by an earlier attempt that died (now KILLED)", flush=True)
    failed = 0
    try:
        done_leaves = record.finished_leaves(c, exp_id)
        todo = [leaf for leaf in plan.leaves if leaf.key not in done_leaves]
        needed = {n.key for leaf in todo for n in plan.chain(leaf.parent)}
        reconcile_nodes(c, exp_id, parent, work / "checkpoints", plan.nodes,
                        lambda n: record.node_tags(n, cfg.name, n.schedule or cfg.stage(n.stage).schedule),
                        attempt, needed, echo=lambda m: print(m, flush=True))
        done_nodes = record.finished_nodes(c, exp_id)
        summary = plan.summary()
        print(f"sweep {cfg.name}: {summary['stage_nodes']} stage nodes ({summary['stage_runs_without_sharing']} "
              f"without sharing), {summary['unlearn_runs']} unlearning runs; already done: "
              f"{sum(k in done_nodes for k in plan.nodes)} nodes, {len(plan.leaves) - len(todo)} runs", flush=True)
        if todo:
            if os.environ.get(faults.ENV):
                os.environ.setdefault(faults.ENV_DRIVER, str(os.getpid()))
            started_ray = _init_ray()
            try:
                check_resources(cfg)
                base = {
                    "config": cfg.model_dump(mode="json"), "config_name": str(cfg.name),
                    "env": {**worker_env(), **faults.env()}, "attempt": attempt,
                    "tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent,
                    "checkpoints": str(work / "checkpoints"),
                    "storage_path": cfg.execution.storage_path or str(work / "ray"),
                    "deepspeed": str(Path(cfg.execution.deepspeed).resolve()) if cfg.execution.deepspeed else None,
                }
                grid = run_trials(cfg, [leaf_to_dict(x) for x in todo], base, done_nodes)
                errors = [r.error for r in grid if r.error is not None]
                failed = len(errors)
                _print_resource_errors(errors)
            finally:
                if started_ray:
                    import ray

                    ray.shutdown()
        else:
            print("nothing to do: every node and unlearning run is already recorded in MLflow", flush=True)
    except BaseException as e:
        reason = f"the sweep driver failed: {type(e).__name__}: {e}"
        try:  # best effort: on a full or read-only disk the record may not take these writes either
            lifecycle.close_attempt_runs(c, exp_id, attempt, reason)
            lifecycle.record_failed_children(c, exp_id, parent, attempt)
            lifecycle.finish_run(c, parent, T.STATUS_FAILED, reason)
        except Exception as close_error:  # noqa: BLE001
            print(f"could not close this attempt's runs: {type(close_error).__name__}", file=sys.stderr)
        raise
    with writing("the MLflow store", store):
        lifecycle.close_attempt_runs(c, exp_id, attempt, "its trial ended without closing it")
        children = lifecycle.record_failed_children(c, exp_id, parent, attempt)
        c.set_terminated(parent, "FAILED" if failed else "FINISHED")
    print(f"sweep {cfg.name} finished in {time.perf_counter() - start:.0f}s; {failed} failed trials, "
          f"{children} failed or killed runs")
    print(f"MLflow: {uri} (experiment '{cfg.name}'); browse with: reteq ui --work-dir {work}")
    if report:
        with writing("the report", work / "report"):
            out = write_sweep_report(cfg, uri, work)
        if out:
            print(f"report: {out}")
    return 1 if failed else 0


def _print_resource_errors(errors: list) -> None:
    """A trial that died of a full or read-only disk: one line each (the path and what it was writing)."""
    from reteq.commands.resources import describe

    for line in dict.fromkeys(filter(None, (describe(str(e)) for e in errors))):
        print(f"error: {line}", file=sys.stderr, flush=True)


def demo_command(config: str | None, work_dir: str | None) -> int:
    """The embedded default end to end: sweep (tiny model, p = 1..4, GA/NPO/SimNPO), theory, report."""
    from reteq.commands.theory import theory_command

    t0 = time.perf_counter()
    cfg = load_config(config or default_demo_config())
    work = resolve_work_dir(work_dir or cfg.work_dir)
    theory_command(None, str(work), False)  # same MLflow store: one UI, one report
    code = sweep_command(cfg, str(work), report=True)
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    print(f"open {work / 'report' / 'report.html'} in a browser; MLflow UI: reteq ui --work-dir {work}")
    return code
