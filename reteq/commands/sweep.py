"""`reteq sweep` and `reteq demo`: the verbs. The sweep itself is reteq.sweep.driver.

validate (config, data, models, DeepSpeed JSON: bad input stops here, before the work dir exists) -> take the
work dir's lock -> run (reteq.sweep.driver.run_locked) -> report (report.html; the MLflow UI command).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from reteq.commands.plan import fits_cluster
from reteq.commands.report import write_sweep_report
from reteq.commands.theory import theory_command
from reteq.config import SweepConfig, load_config
from reteq.errors import BadInput
from reteq.hub_pins import check_pinned
from reteq.mlflow_store import restore_tracking_uri
from reteq.pipeline.context import DataCache
from reteq.pipeline.preflight import preflight
from reteq.plan import build_plan
from reteq.resources import writing
from reteq.sweep import faults
from reteq.sweep.driver import RaySession, SweepOutcome, keep_workers, run_locked
from reteq.sweep.lock import WorkDirLock
from reteq.sweep.ray_session import init_ray
from reteq.train.deepspeed_config import load_deepspeed_config
from reteq.workdir import resolve_work_dir

__all__ = ["SweepOutcome", "default_demo_config", "demo_command", "run_sweep", "sweep_command", "sweep_file_command"]


def default_demo_config() -> Path:
    """configs/demo.yaml of this checkout: the embedded default of `reteq demo`."""
    return Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def sweep_command(cfg: SweepConfig, work_dir: str | None = None, report: bool = True) -> int:
    return run_sweep(cfg, work_dir, report).code


def sweep_file_command(config: str, cluster: str | None, max_leaves: int, overrides: tuple[str, ...],
                       allow_unpinned_hub: bool, work_dir: str | None, report: bool) -> int:
    """`reteq sweep CONFIG`: load the config (with its --set overrides), check it fits the cluster file and pins
    its hub sources (bad input: before any work), then run the sweep."""
    cfg = load_config(config, max_leaves=max_leaves, overrides=overrides)
    fits_cluster(cfg, config, cluster)
    check_pinned(cfg, config, allow_unpinned_hub)
    return sweep_command(cfg, work_dir=work_dir, report=report)


def run_sweep(cfg: SweepConfig, work_dir: str | None = None, report: bool = True) -> SweepOutcome:
    plan = _preflight(cfg)  # bad input fails here, before the work dir exists
    work = resolve_work_dir(work_dir or cfg.work_dir)
    with writing("the work dir", work):
        work.mkdir(parents=True, exist_ok=True)
    with writing("the work dir lock", work / "sweep.lock"):
        lock = WorkDirLock(work).acquire()  # a second sweep on this work dir stops here (exit 2)
    uri_before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        outcome = run_locked(cfg, plan, work)
        if report:
            with writing("the report", work / "report"):
                faults.fault("report")  # every run is closed; only the report is left to write
                out = write_sweep_report(cfg, outcome.tracking_uri, work)
            if out:
                print(f"report: {out}")
        return outcome
    finally:
        lock.release()
        restore_tracking_uri(uri_before)


def _preflight(cfg: SweepConfig):
    plan = build_plan(cfg)
    preflight(cfg, DataCache(cfg), report=lambda line: print(f"preflight: {line}", flush=True))  # bad input fails here
    if cfg.execution.deepspeed:
        load_deepspeed_config(cfg.execution.deepspeed)  # missing or not JSON: one line, before Ray starts
    if cfg.execution.workers > 1 and not cfg.execution.deepspeed:
        raise BadInput("execution.workers > 1 needs execution.deepspeed (data parallelism runs through it)")
    return plan


def demo_command(config: str | None, work_dir: str | None) -> int:
    """The embedded default end to end: sweep (tiny model, p = 1..4, GA/NPO/SimNPO), theory, report."""
    t0 = time.perf_counter()
    cfg = load_config(config or default_demo_config())
    work = resolve_work_dir(work_dir or cfg.work_dir)
    owned = init_ray(keep_workers(cfg))  # one Ray session for both parts
    try:
        theory_command(None, str(work), False)  # same MLflow store: one UI, one report
        code = sweep_command(cfg, str(work), report=True)
    finally:
        RaySession.shutdown(owned)
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    print(f"open {work / 'report' / 'report.html'} in a browser; MLflow UI: reteq ui --work-dir {work}")
    return code
