"""The sweep's parent MLflow run carries the resolved config and its key params; no param is the string "None"."""

from __future__ import annotations

from pathlib import Path

import yaml
from helpers import sweep_cfg

from reteq import tracking as T
from reteq.mlflow_store import ensure_experiment, tracking_client
from reteq.plan import build_plan
from reteq.sweep import record


def _setup(tmp_path, sqlite_tracking, **kw):
    uri, artifacts = sqlite_tracking
    cfg = sweep_cfg(tmp_path, **kw)
    exp = ensure_experiment(uri, cfg.name, artifacts)
    c = tracking_client(uri)
    return cfg, exp, c, record.parent_run(c, exp, cfg.name, cfg.digest())


def test_parent_run_logs_the_resolved_config_and_key_params(tmp_path, sqlite_tracking):
    cfg, _, c, parent = _setup(tmp_path, sqlite_tracking)
    record.log_sweep_config(c, parent, cfg)
    record.log_sweep_config(c, parent, cfg)  # a rerun of the same config reuses the run: same values, no error
    params = c.get_run(parent).data.params
    assert set(params) == set(T.P_SWEEP_PARAMS)
    assert params["models"] == "tiny" and params["orders"] == "inst>tofu>math>U" and params["algorithms"] == "ga"
    assert params["betas"] == "" and params["deepspeed"] == "" and "None" not in params.values()
    local = Path(c.download_artifacts(parent, f"{T.ARTIFACT_CONFIG}/{T.CONFIG_FILE}", str(tmp_path / "dl")))
    assert yaml.safe_load(local.read_text()) == cfg.model_dump(mode="json")


def test_betas_are_listed_per_algorithm_that_takes_one(tmp_path, sqlite_tracking):
    unlearn = {"algorithms": ["ga", "npo"], "lrs": [1e-3], "betas": {"npo": [0.5, 1.0]}, "steps": 2,
               "global_batch": 8, "micro_batch": 8}
    cfg = sweep_cfg(tmp_path, unlearn=unlearn)
    assert record.sweep_params(cfg)["betas"] == "npo:0.5,1"


def test_a_ga_leaf_logs_no_none_param(tmp_path, sqlite_tracking):
    cfg, exp, _, parent = _setup(tmp_path, sqlite_tracking)
    leaf = build_plan(cfg).leaves[0]
    assert leaf.algorithm == "ga" and leaf.beta is None
    hooks = record.MlflowHooks(sqlite_tracking[0], exp, parent, cfg.name, lambda s: "wsd", echo=lambda m: None)
    hooks.leaf_started(leaf)
    hooks.fail_open_runs("test over")
    params = tracking_client(sqlite_tracking[0]).get_run(hooks.leaf_run_id).data.params
    assert "beta" not in params and "None" not in params.values()
    assert params["algorithm"] == "ga" and params["lr"] == "0.001"
