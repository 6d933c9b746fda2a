"""The report inside MLflow: report.html, its tables and its PNG charts as artifacts of the sweep's parent run.

MLflow's artifact view renders the HTML page and the images in place; the page's section links lead back to the
runs each section was drawn from (reteq.analysis.report, reteq.sweep.mlflow_ui).
"""

from __future__ import annotations

from pathlib import Path

from reteq import tracking as T
from reteq.mlflow_store import search_runs, tracking_client
from reteq.sweep.mlflow_ui import save_views


def log_report(tracking_uri: str, experiment: str, report_dir: str | Path, config_hash: str | None = None
               ) -> str | None:
    """Log report_dir (report.html, tables/, charts/) under `report/` of the sweep's parent run: the one of this
    config when its hash is given, else the newest. Returns that run's id; None when the experiment has none."""
    c = tracking_client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = f"tags.`{T.TAG_KIND}` = '{T.KIND_SWEEP}'"
    parents = search_runs(c, exp.experiment_id, query + (f" and tags.`{T.TAG_CONFIG_HASH}` = '{config_hash}'"
                                                         if config_hash else ""),
                          order_by=["attributes.start_time DESC"])
    if not parents and config_hash:
        parents = search_runs(c, exp.experiment_id, query, order_by=["attributes.start_time DESC"])
    if not parents:
        return None
    run_id = parents[0].info.run_id
    c.log_artifacts(run_id, str(report_dir), artifact_path=T.ARTIFACT_REPORT)
    save_views(c, exp.experiment_id)  # the page links them: an experiment from an older reteq gets them now
    return run_id
