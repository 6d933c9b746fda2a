"""What reteq writes for the MLflow UI (no browser; tests/test_mlflow_ui.py drives one): the experiment-kind tag on
new and reopened experiments, the saved views in MLflow 3.17's envelope, the links, and legend-friendly run names."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

from mlflow import MlflowClient

from reteq import tracking as T
from reteq.mlflow_store import ensure_experiment, tracking_client
from reteq.sweep import mlflow_ui, record


def test_new_and_reopened_experiments_open_as_model_training(sqlite_tracking):
    uri, artifacts = sqlite_tracking
    exp = ensure_experiment(uri, "fresh", artifacts)
    assert tracking_client(uri).get_experiment(exp).tags[T.TAG_EXPERIMENT_KIND] == T.EXPERIMENT_KIND_TRAINING
    old = MlflowClient(uri).create_experiment("made-by-an-older-reteq")  # a resumed sweep's experiment
    assert ensure_experiment(uri, "made-by-an-older-reteq", artifacts) == old
    assert MlflowClient(uri).get_experiment(old).tags[T.TAG_EXPERIMENT_KIND] == T.EXPERIMENT_KIND_TRAINING


def test_the_parent_run_saves_the_views_in_mlflows_envelope_once(sqlite_tracking):
    uri, artifacts = sqlite_tracking
    c = tracking_client(uri)
    exp = MlflowClient(uri).create_experiment("sweep")
    record.parent_run(c, exp, "sweep", "hash")
    tags = c.get_experiment(exp).tags
    view = json.loads(tags[T.TAG_SAVED_VIEW.format(T.VIEW_CURVES)])
    assert set(view) == {"name", "createdAt", "updatedAt", "state"} and isinstance(view["createdAt"], int)
    state = json.loads(view["state"])  # MLflow parses the state string itself
    assert state["searchFilter"] == mlflow_ui.UNLEARN_FILTER and state["runsHiddenMode"] == "SHOW_ALL"
    assert state["orderByKey"] == "tags.`mlflow.runName`" and state["orderByAsc"] is True  # not nested: flat
    by_p = json.loads(json.loads(tags[T.TAG_SAVED_VIEW.format(T.VIEW_BY_P)])["state"])
    assert by_p["groupBy"]["groupByKeys"] == [{"mode": "param", "groupByData": "p"}]
    c.set_experiment_tag(exp, T.TAG_SAVED_VIEW.format(T.VIEW_CURVES), "{}")  # a user's override is kept
    record.parent_run(c, exp, "sweep", "hash")
    assert c.get_experiment(exp).tags[T.TAG_SAVED_VIEW.format(T.VIEW_CURVES)] == "{}"


def test_links_land_on_the_model_training_runs_page():
    url = mlflow_ui.view_url("7", base="http://h:1/")
    assert url.startswith("http://h:1/#/experiments/7/runs?")
    query = parse_qs(urlsplit(url).fragment.split("?", 1)[1])
    assert query == {"workflowType": ["machine_learning"], "viewStateShareKey": [T.VIEW_CURVES],
                     "compareRunsMode": ["CHART"]}
    query = parse_qs(urlsplit(mlflow_ui.runs_url("7", mlflow_ui.RE_FILTER)).fragment.split("?", 1)[1])
    assert query["searchFilter"] == [mlflow_ui.RE_FILTER] and query["workflowType"] == ["machine_learning"]


def test_run_names_read_and_sort_well_in_a_legend():
    assert T.leaf_run_name(4, "ga", 1e-3, 0, "tiny") == "p4 · ga · lr1e-3 · s0 · tiny"
    assert T.leaf_run_name(1, "npo", 2.5e-5, 1, "smol", {"beta": 0.5}) == "p1 · npo · b0.5 · lr2.5e-5 · s1 · smol"
    assert T.retrain_run_name(("inst", "tofu", "math"), 0, "tiny") == "θ_r · inst>tofu>math · s0 · tiny"
    assert sorted(T.leaf_run_name(p, "ga", 1e-3, 0, "m") for p in (4, 2, 3, 1))[0].startswith("p1 ")
