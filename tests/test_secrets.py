"""Secrets never leave the head, and the tracking server lets no one in without them (docs/security.md).

One real `mlflow server --app-name basic-auth` on 127.0.0.1 (tests/mlflow_auth.py): an unauthenticated or
wrongly authenticated client is refused, an authenticated one works. Then a real tiny sweep records into it
through `execution.tracking_uri: http://admin:<password>@...`, with a password in `execution.storage_path`
(an S3 URI on moto's S3 server, which takes any secret): the password appears in nothing reteq printed, in no
MLflow param, tag or artifact, in no file of the work dir, in nothing Ray's storage holds, and in no Ray log.
"""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow_auth import AuthServer
from sweep_configs import tiny_sweep

from reteq.cli import EXIT_BAD_INPUT, main
from reteq.config import parse_config
from reteq.redact import TRACKING_PASSWORD, TRACKING_USERNAME, redact, tracking_credentials

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = AuthServer(tmp_path_factory.mktemp("mlflow-auth")).start()
    yield s
    s.stop()


def _get(url: str, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=5")
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        return urllib.request.urlopen(req, timeout=120).status  # a loaded 2-core machine answers slowly
    except urllib.error.HTTPError as e:
        return e.code


def test_the_tracking_server_refuses_clients_without_credentials(server, monkeypatch):
    """cluster.yaml's own unit and secrets step, run here (tests/mlflow_auth.py)."""
    for f in ("mlflow-server.env", "mlflow-client.env"):
        assert (server.home / ".reteq" / f).stat().st_mode & 0o777 == 0o600  # the service user's alone
    assert _get(server.url) == 401
    assert _get(server.url, "admin", "wrong") == 401
    assert _get(server.url, server.user, server.password) == 200
    monkeypatch.delenv(TRACKING_USERNAME, raising=False)
    monkeypatch.delenv(TRACKING_PASSWORD, raising=False)
    with pytest.raises(mlflow.exceptions.MlflowException, match="401|not authenticated"):
        mlflow.MlflowClient(server.url).search_experiments()
    monkeypatch.setenv(TRACKING_USERNAME, server.user)
    monkeypatch.setenv(TRACKING_PASSWORD, server.password)
    assert mlflow.MlflowClient(server.url).create_experiment("authenticated")
    assert server.password not in server.log.read_text()


def test_redact_and_credentials():
    assert redact("postgresql://mlflow:p4ss@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert redact("s3://AK:SK@b/p?endpoint_override=h&secret_key=x") == "s3://AK:***@b/p?endpoint_override=h&secret_key=***"
    assert tracking_credentials("http://al%40ice:p%2Fw@127.0.0.1:5000/x") == (
        "http://127.0.0.1:5000/x", {TRACKING_USERNAME: "al@ice", TRACKING_PASSWORD: "p/w"})
    assert tracking_credentials("sqlite:////tmp/x.db") == ("sqlite:////tmp/x.db", {})




def _files_with(root: Path, secret: str) -> list[str]:
    found = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                if secret.encode() in p.read_bytes():
                    found.append(str(p))
            except OSError:
                pass
    return found


def test_a_storage_path_with_a_credential_is_refused_without_printing_it(tmp_path, capsys):
    raw = tiny_sweep(tmp_path / "work")
    raw["execution"]["storage_path"] = "s3://AKIAEXAMPLE:sk-hidden-42@bucket/ray"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(config)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{config}: execution.storage_path: s3://AKIAEXAMPLE:***@bucket/ray "
                                               "carries a credential"), err
    assert "sk-hidden-42" not in err[0]


def test_a_sweep_with_a_password_in_its_tracking_uri_leaks_it_nowhere(ray_cluster, server, tmp_path, capfd,
                                                                      monkeypatch):
    from reteq.commands.sweep import run_sweep

    for k in (TRACKING_USERNAME, TRACKING_PASSWORD):  # the sweep sets them in this process: undone after
        monkeypatch.delenv(k, raising=False)
    raw = tiny_sweep(tmp_path / "work", name="secret-sweep", retain=("inst",), positions=(2,),
                     algorithms=("ga",), lrs=(1e-3,), workers=1, concurrent=1, deepspeed="", unlearn_steps=1)
    raw["eval"].update(metrics=["forget"], knowledge_stage=None, retrain=False)
    raw["execution"]["tracking_uri"] = f"http://admin:{server.password}@127.0.0.1:{server.port}"
    outcome = run_sweep(parse_config(raw), report=False)
    printed = capfd.readouterr()
    assert outcome.code == 0, printed.out[-3000:]
    assert f"MLflow: http://127.0.0.1:{server.port} (experiment" in printed.out  # where, without the password

    c = mlflow.MlflowClient(outcome.tracking_uri)  # the driver's environment holds the credentials now
    runs = c.search_runs([c.get_experiment_by_name("secret-sweep").experiment_id])
    assert len(runs) == 4  # the parent, two nodes, a leaf
    artifacts = tmp_path / "artifacts"
    for r in runs:
        assert not any(server.password in v for v in (*r.data.params.values(), *r.data.tags.values()))
        mlflow.artifacts.download_artifacts(run_id=r.info.run_id, dst_path=str(artifacts / r.info.run_id),
                                            tracking_uri=outcome.tracking_uri)
    (config,) = artifacts.rglob("sweep.yaml")
    assert f"tracking_uri: http://admin:***@127.0.0.1:{server.port}" in config.read_text()
    ray_logs = Path(ray_cluster._private.worker._global_node.get_logs_dir_path())  # every Ray process's log
    assert server.password not in printed.out and server.password not in printed.err
    for root in (artifacts, tmp_path / "work", ray_logs):  # MLflow's artifacts, the work dir (Tune's state too)
        assert _files_with(root, server.password) == [], root
