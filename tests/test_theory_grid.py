"""The theory grid end to end: Ray Tune trials on the shared local cluster write to a real SQLite MLflow
store, and the report section reads it back and renders PNG charts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reteq import tracking as tk
from reteq.cli import EXIT_BAD_INPUT, main
from reteq.commands.theory import theory_command
from reteq.errors import BadInput, ConfigError
from reteq.theory import grid as g
from reteq.theory.grid import TheoryConfig, load_theory_config, run_theory_grid
from reteq.theory.report import theory_section

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]
SMALL = dict(
    name="theory-test",
    d=[20],
    stage_sizes=[(4, 5)],
    k=[2],
    m=16,
    mu=[1.0],
    eta=[0.5, 1.0],
    seeds=3,
    steps=12,
    cpus_per_trial=0.5,
    max_concurrent_trials=1,
    time_budget_s=240,
)


def _runs(client, experiment_id: str, kind: str):
    return client.search_runs([experiment_id], f"tags.`{tk.TAG_KIND}` = '{kind}'", max_results=1000)


@pytest.mark.ray
def test_grid_logs_every_instance_and_the_report_renders(ray_cluster, sqlite_tracking, tmp_path):
    from mlflow import MlflowClient

    uri, artifact_root = sqlite_tracking
    cfg = TheoryConfig(**SMALL)
    summary = run_theory_grid(cfg, uri, artifact_root, "theory-test", storage_path=str(tmp_path / "tune"))
    assert summary["instances"] == 6 and summary["cells"] == 2
    assert summary["bound_holds"] == 6 and summary["nonvacuous"] <= 6

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("theory-test")
    assert exp.experiment_id == summary["experiment_id"]
    assert exp.artifact_location.startswith(artifact_root)
    (parent,) = _runs(client, exp.experiment_id, tk.KIND_SWEEP)
    assert parent.info.run_id == summary["parent_run_id"] and parent.info.status == "FINISHED"
    assert parent.data.tags[tk.TAG_STATUS] == tk.STATUS_DONE
    assert parent.data.metrics[tk.M_THEORY_GRID_INSTANCES] == 6
    assert parent.data.metrics[tk.M_THEORY_GRID_BOUND_HOLDS] == summary["bound_holds"]

    children = _runs(client, exp.experiment_id, tk.KIND_THEORY)
    assert len(children) == 6
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.tags[tk.TAG_SEED] for c in children) == ["0", "0", "1", "1", "2", "2"]
    assert sorted(float(c.data.params["eta"]) for c in children) == [0.5] * 3 + [1.0] * 3
    assert sum(c.data.metrics[tk.M_THEORY_BOUND_HOLDS] for c in children) == summary["bound_holds"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert set(g.INSTANCE_PARAMS) <= set(child.data.params)
        assert float(child.data.params["sigma_U"]) > 0 and float(child.data.params["rho_star"]) > 0
        for key in (tk.M_THEORY_GROWTH_R2, tk.M_THEORY_LOG1P_RHO, tk.M_THEORY_RETRAIN_GAP_MIN, f"{tk.M_THEORY_RETRAIN_CLOSEST_P}3"):
            assert key in child.data.metrics
    one = children[0].info.run_id
    for key in (tk.M_THEORY_DIVERGENCE, tk.M_THEORY_BOUND, tk.M_THEORY_RETRAIN_GAP):
        history = client.get_metric_history(one, key)
        assert sorted(m.step for m in history) == list(range(cfg.steps + 1))
    divergence = sorted(client.get_metric_history(one, tk.M_THEORY_DIVERGENCE), key=lambda m: m.step)
    assert divergence[-1].value > divergence[0].value  # gradient ascent amplifies the gap between orders

    section = theory_section(uri, "theory-test")
    assert section is not None and section.title.startswith("Theory")
    assert any("on 6 of 6 random instances" in p for p in section.paragraphs)
    assert section.tables["theory_cells"].height == 2
    assert section.tables["theory_cells"]["instances"].to_list() == [3, 3]
    assert set(section.charts) == {"theory_divergence", "theory_growth"}
    for name, chart in section.charts.items():
        path = tmp_path / f"{name}.png"
        chart.save(str(path))
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000

    assert theory_section(uri, "no-such-experiment") is None


@pytest.mark.ray
def test_theory_command_prints_one_json_object(ray_cluster, tmp_path, capsys):
    config = tmp_path / "theory.yaml"
    config.write_text(json.dumps({**SMALL, "name": "cmd", "eta": [1.0], "seeds": 2}))  # JSON is YAML
    assert theory_command(str(config), str(tmp_path / "work"), as_json=True) == 0
    out = capsys.readouterr().out
    summary = json.loads(out)
    assert summary["instances"] == 2 and summary["bound_holds"] == 2 and summary["experiment"] == "cmd"
    assert (tmp_path / "work" / "mlflow.db").is_file()


def test_default_config_is_the_yaml_and_has_at_least_200_instances():
    from_yaml = load_theory_config(REPO / "configs" / "theory.yaml")
    assert from_yaml == TheoryConfig()
    assert from_yaml.instances >= 200
    assert len(from_yaml.cells()) * from_yaml.seeds == from_yaml.instances


def test_bad_theory_configs_name_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("d: [10]\nk: [12]\n")
    with pytest.raises(ConfigError, match="k=12 exceeds d=10"):
        load_theory_config(path)
    path.write_text("mu: [0]\nsteps: 5\nunknown: 1\n")
    with pytest.raises(ConfigError) as info:
        load_theory_config(path)
    assert any("mu[0]" in line for line in info.value.lines)
    assert any("unknown" in line for line in info.value.lines)
    with pytest.raises(ConfigError, match="does not exist"):
        load_theory_config(tmp_path / "missing.yaml")
    assert main(["theory", str(tmp_path / "missing.yaml"), "--work-dir", str(tmp_path / "w"), "--json"]) == 2


@pytest.mark.ray
def test_unmeetable_resources_fail_before_mlflow_is_touched(
    ray_cluster, sqlite_tracking, tmp_path
):
    from mlflow import MlflowClient

    uri, artifact_root = sqlite_tracking
    cfg = TheoryConfig(**{**SMALL, "cpus_per_trial": 16})
    with pytest.raises(BadInput, match="exceeds the cluster"):
        run_theory_grid(cfg, uri, artifact_root, "theory-fail", storage_path=str(tmp_path / "tune"))
    assert MlflowClient(uri).get_experiment_by_name("theory-fail") is None
    config = tmp_path / "greedy.yaml"
    config.write_text(json.dumps({**SMALL, "cpus_per_trial": 16}))
    assert main(["theory", str(config), "--work-dir", str(tmp_path / "work"), "--json"]) == EXIT_BAD_INPUT


@pytest.mark.ray
def test_a_failing_trial_fails_the_grid_and_marks_the_parent_failed(ray_cluster, sqlite_tracking, tmp_path):
    from mlflow import MlflowClient

    uri, artifact_root = sqlite_tracking
    overflowing = TheoryConfig(
        **{**SMALL, "eta": [1.0], "seeds": 1, "steps": 1000}
    )  # (1 + rho*)^2000 > 1e308
    with pytest.raises(RuntimeError, match="1 theory trial"):
        run_theory_grid(
            overflowing, uri, artifact_root, "theory-overflow", storage_path=str(tmp_path / "tune")
        )
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("theory-overflow").experiment_id
    (parent,) = _runs(client, exp_id, tk.KIND_SWEEP)
    assert parent.info.status == "FAILED" and parent.data.tags[tk.TAG_STATUS] == tk.STATUS_FAILED
    assert _runs(client, exp_id, tk.KIND_THEORY) == []
