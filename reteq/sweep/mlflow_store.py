"""The MLflow store, the few calls every writer and reader shares: a client, the experiment, paged run search.

The sweep driver, the theory grid, the analysis loader and the theory report all go through these, so an
experiment is created (or a deleted one restored) one way and a search never stops at its first page.
"""

from __future__ import annotations

from collections.abc import Iterator

PAGE = 1000  # runs per search_runs page


def tracking_client(uri: str):
    """An MlflowClient on `uri`; the fluent API is pointed there too (artifact downloads use it)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str, artifact_root: str | None) -> str:
    """The id of experiment `name`, created when missing (restored when deleted).

    Its artifacts go to `<artifact_root>/<name>` for a local store; a tracking server picks its own.
    """
    c = tracking_client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if artifact_root and not uri.startswith(("http://", "https://", "databricks")):
        location = f"{artifact_root.rstrip('/')}/{name}"
    return c.create_experiment(name, artifact_location=location)


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
