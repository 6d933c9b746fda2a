"""`ray job submit` path: a real Ray head (`ray start --head` on 127.0.0.1), a tiny sweep submitted through
the Jobs API with rayjobs/runtime_env.yaml, waited on until SUCCEEDED, its runs found in MLflow; the driver's
output is the scheduler's own lines, not the workers'."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from reteq import tracking as T
from reteq.tiny import cache_root
from tests.sweep_configs import REPO, tiny_sweep, write

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    port, dash = _free_port(), _free_port()
    token = secrets.token_hex(32)  # Ray 2.60 turns token auth on for `ray start`; keep it on, with our token
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    for leaked in ("MLFLOW_TRACKING_URI", "RETEQ_HOME"):  # set by earlier in-process tests: the jobs resolve their own
        env.pop(leaked, None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths have a length limit
    cmd = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--disable-usage-stats", f"--temp-dir={temp}"]
    # its own agent ports: the test session's shared local cluster holds Ray's fixed defaults, and a head whose
    # dashboard agent cannot bind answers every submission "No available agent to submit job"
    cmd += [f"--{name}-port={_free_port()}" for name in (
        "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent", "metrics-export")]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dash}"
    for _ in range(60):  # the dashboard's job agent answers a few seconds after `ray start`
        probe = subprocess.run([ray_bin, "job", "list"], env={**env, "RAY_ADDRESS": address},
                               capture_output=True, timeout=60)
        if probe.returncode == 0:
            break
        time.sleep(2)
    try:
        yield address, env
    finally:
        _stop_cluster(temp)  # `ray stop` would also kill the session's shared local cluster
        shutil.rmtree(temp, ignore_errors=True)


def _stop_cluster(temp: Path) -> None:
    """Terminate exactly this head's processes (found by their --temp-dir) and their children."""
    import psutil

    roots = [p for p in psutil.process_iter(["cmdline"]) if any(str(temp) in c for c in p.info["cmdline"] or [])]
    procs = set(roots)
    for p in roots:
        try:
            procs.update(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs), timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:  # it exited between the wait and the kill (seen in a full-suite run)
            pass


def _submit(ray_bin: str, job_env: dict, submission: str, env_file: Path, cfg_path: Path) -> str:
    for _ in range(30):  # on a busy machine the head's job agent can lag the dashboard: the API answers 500
        submit = subprocess.run(
            [ray_bin, "job", "submit", "--submission-id", submission, "--working-dir", ".",
             "--runtime-env", str(env_file), "--", "python", "-m", "reteq", "sweep", str(cfg_path), "--no-report"],
            cwd=REPO, env=job_env, capture_output=True, text=True, timeout=900)
        logs = submit.stdout + submit.stderr
        if submit.returncode == 0 or "No available agent to submit job" not in logs:
            break
        time.sleep(2)
    assert submit.returncode == 0, logs[-3000:]
    status = subprocess.run([ray_bin, "job", "status", submission], env=job_env, capture_output=True,
                            text=True, timeout=120)
    assert "succeeded" in (status.stdout + status.stderr).lower()  # "Job '...' succeeded"
    return logs


def test_submit_tiny_sweep_through_jobs_api_twice_into_one_store(ray_head, tmp_path):
    """Exactly the documented command, `ray job submit --working-dir . --runtime-env ... -- python -m reteq
    sweep CONFIG`, run as a subprocess (the CLI reads the auth token from its own environment), twice, with a
    RELATIVE work_dir: each job runs in Ray's per-job package copy, yet both land in ~/reteq-runs/<work_dir>
    (reteq.workdir), so the second resumes from the first's MLflow store and trains nothing."""
    address, env = ray_head
    home = tmp_path / "home"  # the jobs' $HOME, so ~/reteq-runs is a temp folder
    cfg = tiny_sweep(Path("runs/jobs-test"), name="jobs-sweep", positions=(4,), algorithms=("npo",), lrs=(1e-3,),
                     workers=1, concurrent=1, deepspeed="zero0_fp32.json", unlearn_steps=1)
    cfg_path = write(cfg, tmp_path / "sweep.yaml")
    runtime_env = yaml.safe_load((REPO / "rayjobs" / "runtime_env.yaml").read_text())
    runtime_env.setdefault("env_vars", {}).update(
        {k: os.environ[k] for k in ("RETEQ_CACHE", "HF_HUB_OFFLINE", "DS_ACCELERATOR") if k in os.environ})
    runtime_env["env_vars"].update({"HOME": str(home), "TORCH_EXTENSIONS_DIR": os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")),
        "RETEQ_CACHE": str(cache_root())})  # the built tiny model, not a rebuild under the temp $HOME
    runtime_env["env_vars"].pop("RETEQ_HOME", None)
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))

    ray_bin = str(Path(sys.executable).parent / "ray")
    job_env = {**env, "RAY_ADDRESS": address}
    first = _submit(ray_bin, job_env, "reteq-test-job-1", env_file, cfg_path)
    assert "sweep jobs-sweep finished" in first
    assert "[node 4/4]" in first and "[leaf 1/1]" in first  # one line per node and leaf from the driver
    for noise in ("(raylet)", "PreemptionWatcher", "PlacementGroupCleaner"):  # worker output stays in Ray's logs
        assert noise not in first
    work = home / "reteq-runs" / "runs" / "jobs-test"
    assert f"reteq ui --work-dir {work}" in first  # where the job says the UI finds it
    assert (work / "mlflow.db").exists() and (work / "checkpoints").is_dir() and (work / "ray").is_dir()
    ui = mlflow.MlflowClient(tracking_uri=_ui_store(first))  # the store `reteq ui` opens for the printed line
    (exp,) = [e.experiment_id for e in ui.search_experiments() if e.name == "jobs-sweep"]
    runs = ui.search_runs([exp])
    kinds = sorted(r.data.tags.get(T.TAG_KIND) for r in runs)
    assert kinds.count(T.KIND_FINETUNE) == 4 and kinds.count(T.KIND_UNLEARN) == 1
    (sweep,) = [r for r in runs if r.data.tags.get(T.TAG_KIND) == T.KIND_SWEEP]

    second = _submit(ray_bin, job_env, "reteq-test-job-2", env_file, cfg_path)
    assert "nothing to do" in second and "already done: 4 nodes, 1 runs" in second
    assert _ui_store(second) == _ui_store(first)  # both submissions point `reteq ui` at one store
    again = ui.search_runs([exp])
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in runs)  # nothing retrained
    resumed = ui.get_run(sweep.info.run_id)  # the second submission is in it too: its attempt ran the parent
    assert resumed.data.tags[T.TAG_ATTEMPT] != sweep.data.tags[T.TAG_ATTEMPT]
    assert resumed.info.status == "FINISHED"


def _ui_store(logs: str) -> str:
    """The tracking URI `reteq ui` opens for the `reteq ui --work-dir DIR` line a job printed (ui_command's own
    resolution, from this test's directory, not the job's)."""
    from reteq.workdir import resolve_work_dir

    (line,) = {m for m in re.findall(r"reteq ui --work-dir (\S+)", logs)}
    return T.default_tracking_uri(resolve_work_dir(line))
