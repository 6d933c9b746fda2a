"""The MLflow store, the few calls every writer and reader shares: a client, the experiment, paged run search.

The sweep driver, the theory grid, the analysis loader and the theory report all go through these, so an
experiment is created (or a deleted one restored) one way and a search never stops at its first page.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from reteq.workdir import cache_root

PAGE = 1000  # runs per search_runs page
SQLITE = "sqlite:///"


def tracking_client(uri: str):
    """An MlflowClient on `uri`; the fluent API is pointed there too (artifact downloads use it)."""
    import mlflow

    if uri.startswith(SQLITE):
        _new_sqlite_store(Path(uri.removeprefix(SQLITE)))
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def _new_sqlite_store(db: Path) -> None:
    """A new SQLite store starts as a copy of an empty, fully migrated schema built once per machine and MLflow
    version: MLflow's own creation runs every schema migration (3-8 s on 2 cores), each time a sweep, the
    theory grid or a test makes a store. The template holds no experiment: MLflow adds the Default experiment,
    with this store's own artifact root, when it opens the copy. Copies land by hard link, never over an
    existing file, so two processes creating one store both open the same whole file."""
    if db.exists() or not db.parent.is_dir():
        return  # an existing store, or a path MLflow itself should report on
    import mlflow

    template = cache_root() / f"mlflow-schema-{mlflow.__version__}.db"
    try:
        if not template.exists():
            template.parent.mkdir(parents=True, exist_ok=True)
            _publish(template, _build_template)
        _publish(db, lambda tmp: shutil.copyfile(template, tmp))
    except OSError:  # an unwritable cache: MLflow creates the store itself, the slow way
        pass


def _build_template(path: Path) -> None:
    import sqlite3

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
    from reteq.sweep.mlflow_ui import mark_training

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
