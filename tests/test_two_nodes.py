"""Checkpoint delivery across machines: two Ray nodes on 127.0.0.1 (`ray start --head` and `ray start --address`,
separate temp dirs, unusual ports), each with its own checkpoint store (RETEQ_CHECKPOINT_STORE set per node) and
one `reteq_slot` resource, so a SPREAD trial of 2 workers puts one rank on each. Rank 0 trains every stage node
on its machine; the rank on the other machine must fetch each parent from MLflow, verified, before it loads it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest

from reteq import tracking as T
from reteq.config import parse_config
from reteq.plan import build_plan
from tests.sweep_configs import tiny_sweep, write
from tests.test_jobs import _free_port, _stop_cluster

pytestmark = pytest.mark.ray


@pytest.fixture
def two_nodes(tmp_path):
    token = secrets.token_hex(32)
    base = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    base.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    temps, stores = [], []
    try:
        for i in range(2):
            temp = Path(tempfile.mkdtemp(prefix=f"r2n{i}", dir="/tmp"))  # short: socket paths have a limit
            store = tmp_path / f"store-node{i}"
            temps.append(temp)
            stores.append(store)
            where = (["--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={_free_port()}",
                      f"--ray-client-server-port={_free_port()}"] if i == 0 else [f"--address=127.0.0.1:{port}"])
            # two nodes on one machine: each its own agent ports (both would take Ray's fixed defaults)
            own_ports = [f"--{name}-port={_free_port()}" for name in (
                "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent", "metrics-export",
                "node-manager", "object-manager")]
            cmd = [ray_bin, "start", *where, *own_ports, "--node-ip-address=127.0.0.1", "--num-cpus=1",
                   "--resources", json.dumps({"reteq_slot": 1}), f"--temp-dir={temp}", "--disable-usage-stats"]
            started = subprocess.run(cmd, env={**base, "RETEQ_CHECKPOINT_STORE": str(store)}, capture_output=True,
                                     text=True, timeout=300)
            assert started.returncode == 0, (started.stdout + started.stderr)[-3000:]
        yield f"127.0.0.1:{port}", base, stores
    finally:
        for temp in reversed(temps):
            _stop_cluster(temp)
            shutil.rmtree(temp, ignore_errors=True)


def test_a_trial_spread_over_two_nodes_trains_from_parents_made_on_the_other(two_nodes, tmp_path):
    address, env, stores = two_nodes
    raw = tiny_sweep(tmp_path / "work", name="two-nodes", positions=(2,), algorithms=("ga",), lrs=(1e-3,),
                     retain=("inst",), workers=2, concurrent=1, deepspeed="zero0_fp32.json", unlearn_steps=1)
    raw["execution"].update(placement="SPREAD", worker_resources={"reteq_slot": 1}, cpus_per_worker=0.4)
    cfg_path = write(raw, tmp_path / "sweep.yaml")
    plan = build_plan(parse_config(raw))
    sweep = subprocess.run([sys.executable, "-m", "reteq", "sweep", str(cfg_path), "--no-report"],
                           env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=1500)
    assert sweep.returncode == 0, (sweep.stdout + sweep.stderr)[-4000:]

    mlflow.set_tracking_uri(T.default_tracking_uri(tmp_path / "work"))
    runs = mlflow.search_runs(experiment_names=["two-nodes"], output_format="list")
    kinds = sorted(r.data.tags.get(T.TAG_KIND) for r in runs)
    assert kinds.count(T.KIND_FINETUNE) == 2 and kinds.count(T.KIND_UNLEARN) == 1
    # each machine holds every stage node in its own store: one rank trained it there, the other fetched it
    held = [sorted(p.name for p in store.iterdir()) if store.exists() else [] for store in stores]
    assert held[0] == held[1] == sorted(plan.nodes), held
    for key in plan.nodes:
        manifests = [json.loads((store / key / "manifest.json").read_text())["files"] for store in stores]
        assert manifests[0] == manifests[1]
    assert not (tmp_path / "work" / "checkpoints").exists()  # nothing went to the driver's default store
