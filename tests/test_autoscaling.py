"""A sweep through Ray's autoscaler, with a node preempted and checkpoints only in object storage.

Real components: Ray's autoscaler with the fake multi-node provider (worker raylets it starts and stops on this
machine; tests/autoscaling.py derives its node types from cluster.yaml), moto's S3 server as a process, the MLflow
server started from cluster.yaml's own ExecStart line on a throwaway PostgreSQL with its artifacts in S3, and
`ray job submit` of `reteq sweep --cluster cluster.yaml`. No shared file system in use: each Ray node has its
own checkpoint store (RETEQ_CHECKPOINT_STORE=.../{node}), MLflow artifacts and Ray's storage_path are s3://.

The head starts with zero workers (1 CPU of bookkeeping: the launcher and Tune's trial drivers); the sweep pins
its work to the spot type (worker_resources {spot: 1}, as cluster.yaml's gpu_1x_l40s_spot offers). While a
worker trains a second-level stage node its raylet and processes are SIGKILLed (a spot reclaim). The sweep must
still end with one FINISHED run per key, nothing RUNNING, nothing finished retrained, and the same Table 1 as the
same sweep uninterrupted on the session's fixed local cluster; then the autoscaler removes the idle workers.
Then one node's checkpoint object is corrupted in S3 and the lr grid widened: fresh workers (scaled up again,
empty stores) find the corrupt artifact, mark it, the node is retrained once, and every new leaf runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from helpers import reteq_cache  # noqa: F401  (session fixture)
from mlflow import MlflowClient

from reteq import tracking as T
from reteq.commands.report import report_command
from reteq.commands.sweep import run_sweep
from reteq.config import parse_config
from reteq.plan import build_plan
from reteq.tiny import cache_root
from tests.autoscaling import Head, ObjectStore, fake_cluster, free_port
from tests.sweep_configs import REPO, tiny_sweep, write
from tests.test_mlflow_postgres import PG_BIN, Postgres, head_server, head_server_command

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("reteq_cache")]

NAME = "autoscale"
TABLES = ("table_1_forget_score", "table_1_tofu_utility")
NOT_COMPARED = ("run_id", "run_name", "start_time", "link")
PREFIX = "reteq"  # RETEQ_S3 = s3://BUCKET/reteq, as cluster.yaml lays it out


def _config(work: Path, lrs=(1e-3,), **execution) -> dict:
    raw = tiny_sweep(work, name=NAME, retain=("inst", "tofu"), positions=(2, 3), algorithms=("ga",), lrs=lrs,
                     workers=1, concurrent=2, deepspeed="zero0_fp32.json", unlearn_steps=1)
    raw["execution"].update(cpus_per_worker=1, **execution)
    return raw


@pytest.fixture
def object_store(tmp_path):
    store = ObjectStore(tmp_path / "moto.log").start()
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture
def s3_mlflow(object_store, tmp_path):
    """cluster.yaml's MLflow server (its ExecStart line) on PostgreSQL, artifacts to s3://BUCKET/reteq/mlflow."""
    assert PG_BIN, "PostgreSQL binaries absent: `apt-get install postgresql`, as .ci/run does"
    pg = Postgres().start()
    port = free_port()
    cmd = head_server_command(port, pg.port, f"s3://{object_store.bucket}/{PREFIX}")
    try:
        with head_server(cmd, tmp_path / "mlflow-server.log", port, object_store.env()) as uri:
            yield uri
    finally:
        pg.stop()


@pytest.fixture
def head(object_store, tmp_path):
    stores = tmp_path / "stores"
    # reteq on every node's import path, as cluster.yaml installs it on each; no job working_dir: the fake nodes
    # share the head's session dir, and a worker's runtime-env agent deletes the job's unpacked package there
    # when its tasks end (seen: the driver's cwd vanished and Tune failed in os.getcwd)
    h = Head(fake_cluster(REPO / "cluster.yaml"), {**object_store.env(), "RETEQ_CACHE": str(cache_root()),
             "RETEQ_CHECKPOINT_STORE": f"{stores}/{{node}}", "PYTHONPATH": str(REPO)}, tmp_path / "home")
    try:
        yield h.start(), stores
    finally:
        h.stop()


def _submit(head: Head, tmp_path: Path, cfg: Path, sid: str, fault: dict[str, str]) -> subprocess.Popen:
    """`ray job submit --runtime-env ... -- python -m reteq sweep CFG --cluster cluster.yaml`."""
    runtime_env = yaml.safe_load((REPO / "rayjobs" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update({"RETEQ_CACHE": str(cache_root()), **fault,
                                    **{k: os.environ[k] for k in ("HF_HUB_OFFLINE", "DS_ACCELERATOR")
                                       if k in os.environ}})
    env_file = tmp_path / f"runtime_env-{sid}.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--submission-id", sid, "--runtime-env",
           str(env_file), "--", "python", "-m", "reteq", "sweep", str(cfg), "--no-report", "--cluster",
           str(REPO / "cluster.yaml")]
    return subprocess.Popen(cmd, cwd=REPO, env={**head.env, "RAY_ADDRESS": head.address}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _preempt(head: Head, mark: Path, pid_dir: Path, job: subprocess.Popen, out: dict) -> None:
    """Reclaim the worker node whose process stopped at the fault point (the mark file names its pid)."""
    deadline = time.monotonic() + 400
    while job.poll() is None and time.monotonic() < deadline:
        text = mark.read_text() if mark.exists() else ""
        if text.endswith("\n"):
            pid = int(text.split(" pid ")[1])
            node = head.node_of(pid)
            assert node is not None, f"process {pid} runs on no worker node"
            mine = [p for p in pid_dir.glob("*.pid") if json.loads(p.read_text())["pid"] == pid]
            keys = [p.stem for p in sorted(mine, key=lambda p: p.stat().st_mtime)]  # the stage it is in: last
            head.preempt(node)
            out.update(node=node, at=time.monotonic(), keys=keys)
            return
        time.sleep(0.1)


def _tables(work: Path) -> dict[str, pl.DataFrame]:
    out = {}
    for name in TABLES:
        table = pl.read_parquet(work / "report" / "tables" / f"{name}.parquet")
        out[name] = table.drop([c for c in table.columns if c in NOT_COMPARED])
    return out


def _runs(uri: str) -> list:
    c = MlflowClient(uri)
    return c.search_runs([c.get_experiment_by_name(NAME).experiment_id], max_results=10_000)


def _one_finished_each(runs, keys) -> dict[str, object]:
    assert not [r for r in runs if r.info.status == T.RUN_RUNNING], "no run is left RUNNING"
    finished = {}
    for key in keys:
        mine = [r for r in runs if r.data.tags.get(T.TAG_PLAN_KEY) == key]
        done = [r for r in mine if r.info.status == T.RUN_FINISHED]
        assert len(done) == 1, (key, [(r.info.status, r.data.tags.get(T.TAG_ERROR)) for r in mine])
        assert not [r for r in mine if r.info.start_time > done[0].info.end_time], f"{key} retrained"
        finished[key] = done[0]
    return finished


def test_sweep_through_the_autoscaler_survives_a_preempted_node_and_a_corrupt_object(
        ray_cluster, head, s3_mlflow, object_store, tmp_path, capsys):
    h, stores = head
    work = tmp_path / "work"
    raw = _config(work, worker_resources={"spot": 1}, tracking_uri=s3_mlflow,
                  storage_path=f"s3://{object_store.bucket}/{PREFIX}/ray")
    plan = build_plan(parse_config(raw))
    pid_dir, mark = tmp_path / "pids", tmp_path / "preempted"
    killed: dict = {}
    submitted = time.monotonic()
    # a worker process stops at its second stage-node step (a node below one it trained) until it is reclaimed
    job = _submit(h, tmp_path, write(raw, tmp_path / "sweep.yaml"), "autoscale-1",
                  {"RETEQ_FAULT": "node_step:2:node", "RETEQ_FAULT_MARK": str(mark), "RETEQ_PID_DIR": str(pid_dir)})
    threading.Thread(target=_preempt, args=(h, mark, pid_dir, job, killed), daemon=True).start()
    logs, _ = job.communicate(timeout=600)
    ended = time.monotonic()
    (tmp_path / "job-1.log").write_text(logs)
    assert job.returncode == 0 and "succeeded" in logs, logs[-4000:]
    assert killed, "no worker node was preempted"
    killed["key"] = killed["keys"][-1]  # the stage it was training: its second, below one it trained itself
    assert len(killed["keys"]) >= 2 and len(plan.nodes[killed["key"]].prefix) >= 2, killed

    # the autoscaler launched the workers (none at the start), never more than max_workers at once
    seen = h.seen
    assert len(seen.first) >= 2 and 1 <= seen.most_at_once <= 2, (seen, logs[-2000:])
    assert set(seen.types.values()) == {"gpu_1x_l40s_spot"}, seen.types  # the only type offering `spot`
    scale_up = min(seen.first.values()) - submitted
    replacement = [n for n, t in seen.first.items() if t > killed["at"]]

    # one FINISHED run per node, leaf and retrain record; nothing RUNNING; nothing finished was trained again
    runs = _runs(s3_mlflow)
    _one_finished_each(runs, [*plan.nodes, *(leaf.key for leaf in plan.leaves), *plan.records])
    retried = [r for r in runs if r.data.tags.get(T.TAG_PLAN_KEY) == killed["key"]]
    # the reclaimed node's run was closed KILLED (by the retry, reteq.sweep.lifecycle), the retry's FINISHED
    assert sorted(r.info.status for r in retried) == [T.RUN_FINISHED, T.RUN_KILLED], retried

    # no shared file system: checkpoints and Ray's state are in S3; each node's store is its own, and a checkpoint
    # one node trained reached another only through object storage (each key was trained once)
    keys = object_store.keys(PREFIX)
    assert sum(k.endswith(f"/{T.ARTIFACT_CHECKPOINT}/manifest.json") for k in keys) == len(plan.nodes)
    assert any(k.startswith(f"{PREFIX}/ray/") for k in keys)
    assert not (work / "ray").exists() and not (work / "checkpoints").exists() and not (work / "mlartifacts").exists()
    held = {s.name: {p.name for p in s.iterdir() if (p / "manifest.json").exists()} for s in stores.iterdir()}
    copies = sum(len(v) for v in held.values())
    assert copies > len(plan.nodes), held  # at least one checkpoint was fetched onto a node that did not train it
    assert killed["key"] not in held.get(killed["node"], set())  # the reclaimed node's half-trained stage

    # the same Table 1 as the same sweep, uninterrupted, on the session's fixed local cluster (local store)
    assert report_command(str(write(raw, tmp_path / "sweep.yaml")), None, None) == 0
    base = tmp_path / "base"
    assert run_sweep(parse_config(_config(base)), str(base)).code == 0
    capsys.readouterr()
    mine, theirs = _tables(work), _tables(base)
    for name in TABLES:
        assert mine[name].equals(theirs[name]), (name, mine[name], theirs[name])

    # after the sweep the autoscaler removes the idle workers (idle_timeout_minutes 0.25 in the fake cluster)
    idle = time.monotonic()
    while h.workers() and time.monotonic() - idle < 180:
        time.sleep(1)
    assert not h.workers(), "idle workers still up 180 s after the sweep"
    first_round = set(seen.first)
    scale_down = max(seen.last[n] for n in first_round) - ended

    # a checkpoint object corrupted in S3, no machine with a verified copy (the workers are gone): marked,
    # retrained once, and the leaves below it run
    (leaf,) = [x for x in plan.leaves if x.order == ("inst", "tofu", "U")]
    node_run = next(r for r in runs if r.data.tags.get(T.TAG_PLAN_KEY) == leaf.parent
                    and r.info.status == T.RUN_FINISHED)
    (obj,) = [k for k in keys if f"/{node_run.info.run_id}/" in k and k.endswith("model.safetensors")]
    s3 = object_store.client()
    data = s3.get_object(Bucket=object_store.bucket, Key=obj)["Body"].read()
    s3.put_object(Bucket=object_store.bucket, Key=obj, Body=data[:-8] + b"corrupt!")
    wider = {**raw, "unlearn": {**raw["unlearn"], "lrs": [1e-3, 3e-3]}}
    again = time.monotonic()
    job = _submit(h, tmp_path, write(wider, tmp_path / "wider.yaml"), "autoscale-2", {})
    logs2, _ = job.communicate(timeout=600)
    (tmp_path / "job-2.log").write_text(logs2)
    assert job.returncode == 0 and "succeeded" in logs2, logs2[-4000:]
    assert "failed sha256 in MLflow's artifact store and no machine had a verified copy" in logs2, logs2[-4000:]
    fresh = {n: t - again for n, t in seen.first.items() if n not in first_round}
    assert fresh, "the rerun found no workers and the autoscaler launched none"
    runs2 = _runs(s3_mlflow)
    wide = build_plan(parse_config(wider))
    _one_finished_each(runs2, [*wide.nodes, *(x.key for x in wide.leaves), *wide.records])
    node_runs = [r for r in runs2 if r.data.tags.get(T.TAG_PLAN_KEY) == leaf.parent]
    assert sorted(r.data.tags.get(T.TAG_STATUS, "") for r in node_runs if r.info.status == T.RUN_FAILED) == [
        T.STATUS_CORRUPT]
    others = {r.info.run_id for r in runs if r.data.tags.get(T.TAG_KIND) == T.KIND_FINETUNE}
    new_nodes = [r for r in runs2 if r.info.run_id not in others and r.data.tags.get(T.TAG_KIND) == T.KIND_FINETUNE]
    assert [r.data.tags[T.TAG_PLAN_KEY] for r in new_nodes] == [leaf.parent]  # only the corrupt one retrained
    print(f"\nautoscaling: first worker {scale_up:.1f} s after submit; {len(first_round)} workers launched "
          f"({len(replacement)} after the kill), at most {seen.most_at_once} at once; preempted "
          f"{T.order_tag(plan.nodes[killed['key']].prefix)} on {killed['node'][-5:]}; last worker gone "
          f"{scale_down:.0f} s after the sweep; {copies} checkpoint copies on nodes for {len(plan.nodes)} nodes; "
          f"rerun: workers after {sorted(round(t, 1) for t in fresh.values())} s, {time.monotonic() - again:.0f} s "
          "in all", flush=True)
