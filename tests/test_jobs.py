"""`ray job submit` path: a real Ray head (`ray start --head` on 127.0.0.1), a tiny sweep submitted through
the Jobs API with rayjobs/runtime_env.yaml, waited on until SUCCEEDED, its runs found in MLflow."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from reteq import tracking as T
from tests.sweep_configs import REPO, tiny_sweep, write

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    port, dash = _free_port(), _free_port()
    token = secrets.token_hex(32)  # Ray 2.60 turns token auth on for `ray start`; keep it on, with our token
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--disable-usage-stats"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                       capture_output=True, timeout=120)


def test_submit_tiny_sweep_through_jobs_api(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, _ = ray_head
    work = tmp_path / "work"
    cfg = tiny_sweep(work, name="jobs-sweep", positions=(4,), algorithms=("npo",), lrs=(1e-3,), workers=1,
                     concurrent=1, deepspeed="zero0_fp32.json", unlearn_steps=1)
    cfg_path = write(cfg, tmp_path / "sweep.yaml")
    runtime_env = yaml.safe_load((REPO / "rayjobs" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)
    runtime_env.setdefault("env_vars", {}).update(
        {k: os.environ[k] for k in ("RETEQ_CACHE", "HF_HUB_OFFLINE", "DS_ACCELERATOR") if k in os.environ})

    deadline = time.time() + 60
    while True:  # the dashboard's job agent answers a few seconds after `ray start`
        try:
            client = JobSubmissionClient(address)
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(2)
    job = client.submit_job(entrypoint=f"python -m reteq sweep {cfg_path} --no-report", runtime_env=runtime_env)
    deadline = time.time() + 600
    status = client.get_job_status(job)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish within 10 minutes"
        time.sleep(3)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "sweep jobs-sweep finished" in logs

    mlflow.set_tracking_uri(T.default_tracking_uri(work))
    runs = mlflow.search_runs(experiment_names=["jobs-sweep"], output_format="list")
    kinds = sorted(r.data.tags.get(T.TAG_KIND) for r in runs)
    assert kinds.count(T.KIND_FINETUNE) == 4 and kinds.count(T.KIND_UNLEARN) == 1
