"""How a reteq experiment opens in the MLflow UI (3.17): as model training, on a saved view of the unlearning curves.

What MLflow 3.17's UI does (read in its JS bundle, mlflow/server/js/build; docs/mlflow_ui.md shows it):
- The experiment page picks its layout (GenAI "Overview" or "Training runs") from an experiment kind. In 3.17.2 the
  sidebar's global "GenAI | Model training" switch decides it (the URL's `workflowType`, else the browser's
  remembered choice, GenAI at first); the experiment tag `mlflow.experimentKind` decides it only in builds without
  that switch. So every link reteq prints carries `workflowType=machine_learning`, and `mark_training` still tags
  each experiment reteq creates or reopens `custom_model_development` ("Machine learning").
- The runs table nests child runs under their parent, collapsed, only while it is sorted by start time with no
  filter; any filter or another sort lists runs flat. Nothing but a click expands a parent: the one default
  expansion is for parents of `mlflow.runType = evaluation` runs, and a saved view drops expanded rows
  (`runsExpanded`) from what it restores. So reteq keeps its nested runs (the analysis and resume read
  MLflow's parent-run tag) and saves views that list the unlearning runs flat instead.
- A saved view is the experiment tag `mlflow.sharedViewState.<id>` holding {name, createdAt, updatedAt, state},
  state being the runs page's search facets and UI state as JSON; the page's "Views" menu lists them, and
  `#/experiments/<id>/runs?viewStateShareKey=<id>` opens one. reteq's views filter to the unlearning runs, sort
  them by name (p first, so the legend reads p = 1..4) and show every run in the charts (MLflow's default draws
  only the first 10 runs).
"""

from __future__ import annotations

import json
import time
from urllib.parse import quote, urlencode

from reteq import tracking as T
from reteq.mlflow_store import mark_training  # the tag every experiment reteq makes carries

DEFAULT_UI_BASE = "http://127.0.0.1:5000"
ORDER_BY_NAME = "tags.`mlflow.runName`"  # MLflow's own sort key for the run name
WORKFLOW = {"workflowType": "machine_learning"}  # the "Model training" side of MLflow's GenAI | Model training switch
SHOW_ALL = "SHOW_ALL"  # runsHiddenMode: every run drawn in the charts (MLflow's default: the first 10)
UNLEARN_FILTER = f"tags.`{T.TAG_KIND}` = '{T.KIND_UNLEARN}'"
RETRAIN_FILTER = f"tags.`{T.TAG_KIND}` = '{T.KIND_RETRAIN}'"
# unlearning runs measured against a theta_r, and the theta_r records themselves (both carry the retrain key)
RE_FILTER = f"tags.`{T.TAG_RETRAIN_KEY}` != ''"


def _curves_state(group_by_p: bool = False) -> dict:
    state = {"searchFilter": UNLEARN_FILTER, "orderByKey": ORDER_BY_NAME, "orderByAsc": True,
             "runsHiddenMode": SHOW_ALL, "hideEmptyCharts": True, "groupBy": None}
    if group_by_p:
        state["groupBy"] = {"aggregateFunction": "average", "groupByKeys": [{"mode": "param", "groupByData": "p"}]}
        state["useGroupedValuesInCharts"] = True
    return state


VIEWS = {  # view id -> (the name in MLflow's "Views" menu, its state)
    T.VIEW_CURVES: ("reteq: unlearning curves (one line per run)", _curves_state()),
    T.VIEW_BY_P: ("reteq: unlearning curves grouped by p (mean, min-max band)", _curves_state(group_by_p=True)),
}


def saved_view_value(name: str, state: dict, now_ms: int | None = None) -> str:
    """A saved view as MLflow 3.17 stores it in the experiment tag (the state itself a JSON string)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    return json.dumps({"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)})


def save_views(client, exp_id: str) -> None:
    """reteq's saved views, written when missing (a view a user overrode in the UI is left as they saved it),
    and the experiment-kind tag."""
    tags = client.get_experiment(exp_id).tags
    mark_training(client, exp_id, tags)
    for view_id, (name, state) in VIEWS.items():
        key = T.TAG_SAVED_VIEW.format(view_id)
        if key not in tags:
            client.set_experiment_tag(exp_id, key, saved_view_value(name, state))


def view_url(exp_id: str, view: str = T.VIEW_CURVES, base: str = DEFAULT_UI_BASE, charts: bool = True) -> str:
    """The runs page opened on one of reteq's saved views, in the chart view."""
    query = {**WORKFLOW, "viewStateShareKey": view, **({"compareRunsMode": "CHART"} if charts else {})}
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs?{urlencode(query)}"


def runs_url(exp_id: str, search_filter: str = "", base: str = DEFAULT_UI_BASE, charts: bool = True) -> str:
    """The runs page with a filter (runs listed flat, sorted by name). MLflow ignores a saved view when the URL has
    a filter, so this opens with the user's own "show first 10/20/all" setting."""
    query = {**WORKFLOW, "searchFilter": search_filter, "orderByKey": ORDER_BY_NAME, "orderByAsc": "true"}
    if charts:
        query["compareRunsMode"] = "CHART"
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs?{urlencode(query, quote_via=quote)}"


def experiment_url(exp_id: str, base: str = DEFAULT_UI_BASE) -> str:
    """The experiment as its "Model training" page: MLflow opens its runs tab (the table, nested runs collapsed)."""
    return f"{base.rstrip('/')}/#/experiments/{exp_id}?{urlencode(WORKFLOW)}"


def prepare_store(c) -> list[tuple[str, str, bool]]:
    """Every active experiment of the store `c` (an MlflowClient on an existing store, from
    reteq.mlflow_store) that holds a reteq sweep gets the kind tag and, when it
    has unlearning runs, reteq's views (an experiment written before reteq set them); returns (name, id, has
    views) of those experiments, in name order."""

    def has(exp_id: str, search_filter: str) -> bool:
        return bool(c.search_runs([exp_id], filter_string=search_filter, max_results=1))

    out = []
    for exp in c.search_experiments():
        if not has(exp.experiment_id, f"tags.`{T.TAG_KIND}` = '{T.KIND_SWEEP}'"):
            continue
        views = has(exp.experiment_id, UNLEARN_FILTER)
        if views:
            save_views(c, exp.experiment_id)
        else:  # the theory grid: no unlearning curves to view
            mark_training(c, exp.experiment_id, exp.tags)
        out.append((exp.name, exp.experiment_id, views))
    return sorted(out)
