"""`reteq report` (MLflow -> polars -> altair -> report.html) and `reteq ui` (the MLflow UI on 127.0.0.1)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl

from reteq import tracking as T
from reteq.analysis.leaves import FILE, merge_leaves
from reteq.analysis.load import experiment_id
from reteq.analysis.mlflow_report import log_report
from reteq.analysis.report import ReportSettings, write_report
from reteq.config import SweepConfig, load_config
from reteq.errors import BadInput
from reteq.estimate import format_plan, plan_report
from reteq.mlflow_store import reader
from reteq.redact import redact
from reteq.resources import write_whole
from reteq.sweep import mlflow_ui
from reteq.workdir import resolve_work_dir


def write_sweep_report(cfg: SweepConfig | None, uri: str, work: Path, experiment: str | None = None,
                       forget_target: float | None = None) -> Path:
    """report.html (and leaves.csv) of a sweep, with the plan and, when it was run into the same store, the theory
    grid; logged as artifacts of the sweep's parent run. forget_target: the equal-forgetting score (default
    reteq.analysis.recency_stats.EQUAL_FORGETTING_TARGET)."""
    # lazy: Ray/MLflow only when the theory section is drawn
    from reteq.theory.report import theory_section

    plan_text = format_plan(cfg, plan_report(cfg)) if cfg is not None else None
    name = experiment or cfg.name
    # write_report itself adds the section when the report *is* the theory experiment
    section = theory_section(uri, T.THEORY_EXPERIMENT) if name != T.THEORY_EXPERIMENT else None
    extra = [section] if section is not None else []
    depth = (cfg.eval.depth_fall, cfg.eval.depth_margin) if cfg is not None else (0.5, 0.0)
    target = {} if forget_target is None else {"forget_target": forget_target}
    path = write_report(uri, name, work / "report", plan_text=plan_text, extra_sections=extra,
                        settings=ReportSettings(depth_thresholds=depth, **target))

    try:  # the report inside MLflow too; the file on disk is the result, so a store that refuses is only noted
        run_id = log_report(uri, name, path.parent, cfg.digest() if cfg is not None else None)
        if run_id:
            print(f"report: logged under {T.ARTIFACT_REPORT}/ of MLflow run {run_id}", flush=True)
    except Exception as err:  # noqa: BLE001
        print(f"report: not logged to MLflow ({type(err).__name__}: {err})", flush=True)
    return path


def report_command(config: str | None, experiment: str | None, work_dir: str | None,
                   leaves_out: str | None = None, forget_target: float | None = None,
                   leaves_merge: bool = False) -> int:
    """The report of a sweep; `leaves_out` also copies its leaves.csv there (docs/results_smol/leaves.csv is
    written so: `reteq report configs/smol_science.yaml --leaves-out docs/results_smol/leaves.csv`). With
    `leaves_merge`, this store's leaves are merged into the file already there (reteq.analysis.leaves.merge_leaves):
    a design run slice by slice on several machines or sessions, each with its own store."""
    if leaves_merge and not leaves_out:
        raise BadInput("report: --leaves-merge: needs --leaves-out FILE (the leaves.csv to merge into)")
    if forget_target is not None and not math.isfinite(forget_target):
        raise BadInput(f"report: --forget-target: must be a finite forget score, got {forget_target}")
    cfg = load_config(config) if config else None
    if cfg is None and not experiment:
        raise BadInput("report: give a sweep config or --experiment NAME")
    work = resolve_work_dir(work_dir or (cfg.work_dir if cfg else "runs/demo"))
    uri = (cfg.execution.tracking_uri if cfg else None) or T.default_tracking_uri(work)
    experiment_id(uri, experiment or cfg.name)  # a typo, or no store yet: one line (exit 2), before any reading
    out = write_sweep_report(cfg, uri, work, experiment, forget_target)
    print(f"report: {out}")
    if leaves_out:
        target = Path(leaves_out)
        target.parent.mkdir(parents=True, exist_ok=True)
        if leaves_merge and target.exists():
            _merge_into(target, out.parent / FILE)
        else:
            shutil.copyfile(out.parent / FILE, target)
            print(f"report: leaves table copied to {target}")
    return 0


def _merge_into(target: Path, fresh: Path) -> None:
    """This store's leaves.csv merged into `target`, written whole or not at all (a temp file renamed over it)."""
    try:
        kept = pl.read_csv(target, infer_schema_length=None)
    except (pl.exceptions.PolarsError, OSError) as err:
        raise BadInput(f"{target}: not a readable leaves.csv ({type(err).__name__}: {err})") from err
    new = pl.read_csv(fresh, infer_schema_length=None)
    try:
        merged = merge_leaves(kept, new, str(target))
    except ValueError as err:
        raise BadInput(str(err)) from err
    write_whole(target, merged.write_csv)
    print(f"report: {new.height} leaves of this store merged into {target} ({kept.height} there before, "
          f"{merged.height} now)")


def ui_command(work_dir: str, port: int) -> int:
    """The MLflow UI on the work dir's store; first, each sweep's experiment is tagged to open on its runs page
    with reteq's saved views (an experiment written by an older reteq too), and their links are printed."""
    work = resolve_work_dir(work_dir)
    uri = T.default_tracking_uri(work)
    base = f"http://127.0.0.1:{port}"
    print(f"MLflow UI for {redact(uri)} on {base} (Ctrl-C to stop)", flush=True)
    if not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists():
        for name, exp_id, views in mlflow_ui.prepare_store(reader(uri)):
            url = mlflow_ui.view_url(exp_id, base=base) if views else mlflow_ui.experiment_url(exp_id, base)
            print(f"  {name}: {url}", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port)]
    return subprocess.call(cmd)
