"""A new SQLite store is a copy of a migrated schema template: it must behave exactly like one MLflow made."""

from __future__ import annotations

from reteq import mlflow_store
from reteq.mlflow_store import ensure_experiment, tracking_client


def test_a_store_from_the_template_is_a_whole_mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("RETEQ_CACHE", str(tmp_path / "cache"))
    stores = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        uri = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
        c = tracking_client(uri)
        default = c.get_experiment("0")  # added by MLflow when it opens the copy, as for a store it made itself
        assert default.name == "Default" and "cache" not in default.artifact_location
        exp = ensure_experiment(uri, "x", (tmp_path / name / "art").as_uri())
        run = c.create_run(exp)
        c.log_metric(run.info.run_id, "m", 1.0)
        stores.append((uri, run.info.run_id))
    templates = list((tmp_path / "cache").glob("mlflow-schema-*.db"))
    assert len(templates) == 1, "built once per machine and MLflow version"
    built = templates[0].stat().st_mtime_ns

    uri, run_id = stores[0]
    c = tracking_client(uri)  # opening an existing store again never replaces it with the template
    assert c.get_run(run_id).data.metrics == {"m": 1.0}
    assert templates[0].stat().st_mtime_ns == built
    assert [r.info.run_id for r in mlflow_store.iter_runs(c, c.get_experiment_by_name("x").experiment_id)] == [run_id]
    assert not list(tmp_path.rglob(".*.tmp")), "no temporary file left behind"
