"""A real `mlflow server --app-name basic-auth` on 127.0.0.1, set up the way docs/cluster.md sets up the
cluster's: an auth config that denies by default, the admin password and the Flask secret from an environment
file readable only by its owner (never on the command line)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from distributed import free_port

BIN = Path(sys.executable).parent


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
        self.password = "pw-" + secrets.token_hex(12)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = root / "server.log"

    def start(self, timeout: float = 240) -> AuthServer:
        ini = self.root / "basic_auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                       f"database_uri = sqlite:///{self.root / 'auth.db'}\nadmin_username = admin\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env_file = self.root / "mlflow-server.env"
        env_file.touch(mode=0o600)
        env_file.write_text(f"MLFLOW_AUTH_ADMIN_PASSWORD={self.password}\n"
                            f"MLFLOW_FLASK_SERVER_SECRET_KEY={secrets.token_hex(16)}\n"
                            f"MLFLOW_AUTH_CONFIG_PATH={ini}\n")
        env = {**os.environ, **read_env_file(env_file), "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--default-artifact-root", str(self.root / "artifacts")],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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
