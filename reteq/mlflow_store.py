"""MLflow's one home: the only module that builds an MlflowClient or points MLflow at a store, and the one place
that says which run of a node or leaf key is its result.

The sweep driver and its workers, the theory grid, the analysis loader and the theory report all go through
these, so an experiment is created (or a deleted one restored) one way, a search never stops at its first page,
and resume, delivery and repair agree on "the finished run of a key" (tests/test_homes.py keeps it so).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from reteq import tracking as T
from reteq.workdir import cache_root

# mlflow is imported inside functions: `reteq plan` and the light Tune trials import this module without it.

PAGE = 1000  # runs per search_runs page
SQLITE = "sqlite:///"


def tracking_client(uri: str):
    """A writer's MlflowClient on `uri` (a new SQLite store is made from the template first); the fluent API is
    pointed there too (artifact downloads and the system-metrics monitor use it)."""
    if uri.startswith(SQLITE):
        _new_sqlite_store(Path(uri.removeprefix(SQLITE)))
    point_fluent_api(uri)
    return reader(uri)


def _mlflow():
    """The mlflow module, imported on first use: the one place this module imports it."""
    import mlflow  # lazy: `reteq plan` and the light Tune trial processes import this module without MLflow

    return mlflow


def reader(uri: str):
    """A reader's MlflowClient on `uri`: creates no store and leaves the fluent API where it points."""
    return _mlflow().MlflowClient(tracking_uri=uri)


def point_fluent_api(uri: str | None) -> None:
    """mlflow.set_tracking_uri, which also exports MLFLOW_TRACKING_URI (None: back to MLflow's default)."""
    _mlflow().set_tracking_uri(uri)


def restore_tracking_uri(before: str | None) -> None:
    """Point MLflow back at `before` (MLFLOW_TRACKING_URI as it was before a sweep), so a later sweep in this
    process with another work dir records into its own store, not the last one's (`default_tracking_uri` obeys
    that variable)."""
    if os.environ.get("MLFLOW_TRACKING_URI") != before:
        point_fluent_api(before)


def _new_sqlite_store(db: Path) -> None:
    """A new SQLite store starts as a copy of an empty, fully migrated schema built once per machine and MLflow
    version: MLflow's own creation runs every schema migration (3-8 s on 2 cores), each time a sweep, the
    theory grid or a test makes a store. The template holds no experiment: MLflow adds the Default experiment,
    with this store's own artifact root, when it opens the copy. Copies land by hard link, never over an
    existing file, so two processes creating one store both open the same whole file."""
    if db.exists() or not db.parent.is_dir():
        return  # an existing store, or a path MLflow itself should report on
    template = cache_root() / f"mlflow-schema-{_mlflow().__version__}.db"
    try:
        if not template.exists():
            template.parent.mkdir(parents=True, exist_ok=True)
            _publish(template, _build_template)
        _publish(db, lambda tmp: shutil.copyfile(template, tmp))
    except OSError:  # an unwritable cache: MLflow creates the store itself, the slow way
        pass


def _build_template(path: Path) -> None:
    # lazy: `reteq plan` and light Tune trials import this module without MLflow
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(f"{SQLITE}{path}", path.parent.as_uri())._dispose_engine()  # migrates, adds experiment 0
    con = sqlite3.connect(path)
    with con:
        con.execute("DELETE FROM experiments WHERE experiment_id = 0")
    con.close()


def _publish(dst: Path, write) -> None:
    """write(tmp) then link tmp to dst; never over an existing dst (another process's store, maybe in use)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.link(tmp, dst)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def ensure_experiment(uri: str, name: str, artifact_root: str | None) -> str:
    """The id of experiment `name`, created when missing (restored when deleted), tagged as model training so
    the MLflow UI opens it on its runs page (reteq.sweep.mlflow_ui).

    Its artifacts go to `<artifact_root>/<name>` for a local store; a tracking server picks its own.
    """
    c = tracking_client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            c.restore_experiment(exp.experiment_id)
        mark_training(c, exp.experiment_id, exp.tags)  # an experiment made before reteq set the tag
        return exp.experiment_id
    location = None
    if artifact_root and not uri.startswith(("http://", "https://", "databricks")):
        location = f"{artifact_root.rstrip('/')}/{name}"
    exp_id = c.create_experiment(name, artifact_location=location)
    mark_training(c, exp_id)
    return exp_id


def mark_training(client, exp_id: str, tags: dict[str, str] | None = None) -> None:
    """Tag the experiment as model training (the MLflow UI then opens its runs page), unless it already is."""
    if (tags or {}).get(T.TAG_EXPERIMENT_KIND) != T.EXPERIMENT_KIND_TRAINING:
        client.set_experiment_tag(exp_id, T.TAG_EXPERIMENT_KIND, T.EXPERIMENT_KIND_TRAINING)


def iter_runs(client, experiment_id: str, filter_string: str = "", order_by: list[str] | None = None,
              ) -> Iterator:
    """Every active run of the experiment that matches, page by page (thousands of runs: a few queries)."""
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=PAGE,
                                  order_by=order_by, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def search_runs(client, experiment_id: str, filter_string: str = "", order_by: list[str] | None = None) -> list:
    """`iter_runs` as a list."""
    return list(iter_runs(client, experiment_id, filter_string, order_by))


# ---- the finished run of a key ----------------------------------------------------------------------------------
# A run counts when MLflow calls it FINISHED and its reteq.status says done or collapsed (a run tagged done whose
# process died before set_terminated is not one yet: the next attempt finishes it). A key should have one; when
# an earlier bug or a race left two, the oldest wins everywhere: resume, delivery, repair and the analysis.
COUNTED = (T.STATUS_DONE, T.STATUS_COLLAPSED)


def counted(runs) -> list:
    """The runs that count, oldest first (the first one of each key is its result)."""
    runs = [r for r in runs if r.info.status == T.RUN_FINISHED and r.data.tags.get(T.TAG_STATUS) in COUNTED]
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def finished_runs(c, exp_id: str, key: str | None = None) -> list:
    """The counted runs of one node or leaf key (at most one, normally), or of the whole experiment when `key`
    is None; oldest first."""
    by_key = f"tags.`{T.TAG_PLAN_KEY}` = '{key}' and " if key is not None else ""
    return counted(search_runs(c, exp_id, f"{by_key}attributes.status = '{T.RUN_FINISHED}'"))


def finished_run(c, exp_id: str, key: str) -> str | None:
    """The run id of the result of `key` (its oldest counted run), or None when it has none."""
    runs = finished_runs(c, exp_id, key)
    return runs[0].info.run_id if runs else None
