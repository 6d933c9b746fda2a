"""The head's MLflow server, started from cluster.yaml's own ExecStart line, on a real PostgreSQL, with a tiny sweep
logged through it (real local Ray; the nodes and the leaf run as Ray tasks and a Tune trial in processes of
their own, each logging to the server). Multi-worker DeepSpeed runs are tests/test_sweep.py's; here they would
only triple the time.

PostgreSQL is Debian's package (initdb/pg_ctl from /usr/lib/postgresql/*/bin), run in a temp dir on 127.0.0.1 by
the `postgres` user when the test runs as root (initdb refuses root). `.ci/run` installs the package; the test is
skipped, saying why, only where those binaries are absent.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shlex
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import yaml
from helpers import reteq_cache  # noqa: F401

from reteq import tracking as T
from reteq.commands.sweep import sweep_command
from reteq.config import parse_config
from tests.sweep_configs import REPO, tiny_sweep

pytestmark = pytest.mark.ray

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command_line() -> str:
    """The `mlflow server` ExecStart line of the systemd unit that cluster.yaml's head_setup_commands write."""
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    lines = [line.strip() for cmd in cluster["head_setup_commands"] for line in cmd.splitlines()
             if line.strip().startswith("ExecStart=")]
    assert len(lines) == 1, lines
    return lines[0].removeprefix("ExecStart=")


def head_server_command(port: int, pg_port: int, artifacts_uri: str) -> list[str]:
    """cluster.yaml's ExecStart line with the head's variables filled in for this machine: the venv's bin for
    $HOME/venv/bin, a PostgreSQL on `pg_port` in the URI shape cluster.yaml uses, `artifacts_uri` for $RETEQ_S3,
    and 127.0.0.1:`port` for the head's private address and port 5000, without the basic-auth app (that app and
    its secrets are tests/test_secrets.py's; here the store is under test)."""
    line = server_command_line()
    assert "--host $RETEQ_HEAD_IP --port 5000" in line, line  # private only
    line = line.replace("--host $RETEQ_HEAD_IP --port 5000", f"--host 127.0.0.1 --port {port}")
    line = line.replace(" --app-name basic-auth", "")
    line = line.replace("$HOME/venv/bin/", f"{Path(sys.executable).parent}/")
    db = cluster_env_value("RETEQ_MLFLOW_DB").replace("@127.0.0.1:5432/", f"@127.0.0.1:{pg_port}/")
    assert db.startswith("postgresql+psycopg://"), db  # the driver requirements.lock installs
    return shlex.split(string.Template(line).substitute(RETEQ_MLFLOW_DB=db, RETEQ_S3=artifacts_uri))


@contextlib.contextmanager
def head_server(cmd: list[str], log_path: Path, port: int, env: dict[str, str] | None = None) -> Iterator[str]:
    """`cmd` (a head_server_command) as a process group until the block ends; yields its URI once it answers."""
    # the environment, not the command: uvicorn kills a worker that misses a 5 s health ping, which a loaded
    # 2-core test machine does (an endless restart loop); a head node has the cores to answer
    env = {**os.environ, **(env or {}), "MLFLOW_DISABLE_TELEMETRY": "true", "UVICORN_TIMEOUT_WORKER_HEALTHCHECK": "120"}
    env.pop("MLFLOW_TRACKING_URI", None)
    uri = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while True:
                assert server.poll() is None, log_path.read_text()[-3000:]
                try:
                    with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1",
                                                timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "MLflow server did not answer within 300 s"
                time.sleep(2)
            yield uri
        finally:
            os.killpg(server.pid, 15)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait()


def cluster_env_value(name: str) -> str:
    """A variable's value as cluster.yaml's setup_commands write it to ~/reteq.env."""
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for cmd in cluster["setup_commands"]:
        for line in cmd.splitlines():
            if line.strip().startswith(f"export {name}="):
                return line.strip().removeprefix(f"export {name}=").split()[0]
    raise AssertionError(f"cluster.yaml sets no {name}")


class Postgres:
    """A throwaway PostgreSQL on 127.0.0.1:port with role and database `mlflow` (trust auth on loopback)."""

    def __init__(self):
        self.bin = Path(PG_BIN[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="reteq-pg-", dir="/tmp"))
        self.port = _free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run the server as Debian's postgres user
            shutil.chown(self.dir, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=300, cwd="/tmp")

    def start(self) -> Postgres:
        data = self.dir / "data"
        self.run(str(self.bin / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8")
        self.run(str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "log"), "-w", "-t", "120",
                 "-o", f"-h 127.0.0.1 -p {self.port} -k {self.dir}", "start")
        self.run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", "mlflow")
        return self

    def stop(self) -> None:
        try:
            self.run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres():
    if not PG_BIN:
        pytest.skip("PostgreSQL binaries absent (no /usr/lib/postgresql/*/bin/initdb): `apt-get install postgresql`, "
                    "as .ci/run does")
    pg = Postgres().start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """cluster.yaml's MLflow server on this PostgreSQL, its artifacts in a local folder."""
    port = _free_port()
    artifacts = tmp_path / "s3"
    cmd = head_server_command(port, postgres.port, artifacts.as_uri())
    with head_server(cmd, tmp_path / "mlflow-server.log", port) as uri:
        yield uri, artifacts


def test_cluster_server_command_names_an_installed_driver():
    import sqlalchemy

    db = cluster_env_value("RETEQ_MLFLOW_DB")
    engine = sqlalchemy.create_engine(db)  # resolves (imports) the driver without connecting
    assert engine.dialect.driver == "psycopg"
    assert "$RETEQ_MLFLOW_DB" in server_command_line()


@pytest.mark.usefixtures("reteq_cache")
def test_tiny_sweep_logs_to_the_cluster_server_on_postgres(ray_cluster, mlflow_server, tmp_path):
    uri, artifacts = mlflow_server
    raw = tiny_sweep(tmp_path / "work", name="pg-sweep", positions=(4,), algorithms=("ga",), lrs=(1e-3,),
                     workers=1, concurrent=1, deepspeed="zero0_fp32.json", unlearn_steps=1)
    raw["execution"]["tracking_uri"] = uri
    cfg = parse_config(raw)
    assert sweep_command(cfg, report=False) == 0
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["pg-sweep"], output_format="list")
    kinds = sorted(r.data.tags.get(T.TAG_KIND) for r in runs)
    assert kinds.count(T.KIND_FINETUNE) == 4 and kinds.count(T.KIND_UNLEARN) == 1 and T.KIND_SWEEP in kinds
    parent = next(r for r in runs if r.data.tags.get(T.TAG_KIND) == T.KIND_SWEEP)
    assert parent.data.params["algorithms"] == "ga" and "None" not in parent.data.params.values()
    published = list(artifacts.rglob("manifest.json"))  # checkpoints went through the server to its store
    assert len(published) == 4
    assert not list((tmp_path / "work").glob("mlflow.db"))  # nothing fell back to a local SQLite store

