"""cluster.yaml's tracking server, run here: the head's secrets made by its own setup step (with HOME pointing at
a temp dir), then its systemd unit's `mlflow server --app-name basic-auth` ExecStart line with the head's
variables filled in for this machine (127.0.0.1 for the private address, a free port, SQLite and a local folder
for PostgreSQL and S3), its Environment= lines and its EnvironmentFile as the service's environment."""

from __future__ import annotations

import os
import shlex
import signal
import string
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from distributed import free_port

REPO = Path(__file__).resolve().parent.parent


def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def unit_lines(prefix: str) -> list[str]:
    """The lines of the systemd unit head_setup_commands writes that start with `prefix` (e.g. "ExecStart=")."""
    return [line.strip().removeprefix(prefix) for cmd in cluster()["head_setup_commands"]
            for line in cmd.splitlines() if line.strip().startswith(prefix)]


def secrets_step() -> str:
    """The head_setup_commands step that makes ~/.reteq/mlflow-server.env and mlflow-client.env."""
    [step] = [c for c in cluster()["head_setup_commands"] if "mlflow-server.env" in c and "openssl rand" in c]
    return step


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


class AuthServer:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.home = root / "home"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = root / "server.log"
        self.password = ""

    def start(self, timeout: float = 240) -> AuthServer:
        self.home.mkdir(parents=True)
        subprocess.run(["bash", "-c", secrets_step()], env={**os.environ, "HOME": str(self.home)}, check=True)
        client = read_env_file(self.home / ".reteq" / "mlflow-client.env")
        self.user, self.password = client["MLFLOW_TRACKING_USERNAME"], client["MLFLOW_TRACKING_PASSWORD"]
        fill = {"HOME": str(self.home), "RETEQ_HEAD_IP": "127.0.0.1",
                "RETEQ_MLFLOW_DB": f"sqlite:///{self.root / 'mlflow.db'}", "RETEQ_S3": (self.root / "s3").as_uri()}
        [exec_start] = unit_lines("ExecStart=")
        line = exec_start.replace("$HOME/venv/bin/", f"{Path(sys.executable).parent}/")
        assert "--port 5000" in line, line
        cmd = shlex.split(string.Template(line.replace("--port 5000", f"--port {self.port}")).substitute(fill))
        env = {**os.environ, "UVICORN_TIMEOUT_WORKER_HEALTHCHECK": "120"}
        for assignment in unit_lines("Environment="):
            k, _, v = string.Template(assignment).substitute(fill).partition("=")
            env[k] = v
        [env_file] = unit_lines("EnvironmentFile=")
        env.update(read_env_file(Path(string.Template(env_file).substitute(fill))))
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
