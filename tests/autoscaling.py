"""An autoscaling Ray cluster and S3-compatible object storage on one machine, for tests/test_autoscaling.py.

`fake_cluster` derives a cluster config for Ray's fake multi-node provider from cluster.yaml's node types: the
same type names and custom resources (`spot`), CPU-only stand-ins for the GPU types, small counts. `Head` runs
`ray start --head --autoscaling-config` with RAY_FAKE_CLUSTER=1: Ray's own autoscaler (the monitor process on
the head) then starts and stops worker raylets on demand, as it launches and terminates cloud instances.

Traps, all checked on Ray 2.60 (docs/cluster.md, "Autoscaling and preemption"): Ray's `AutoscalingCluster` needs
a YAML its wheel lacks and runs `ray stop --force` (every Ray process of the machine); the fake provider starts
workers against GCS port 6379 (unless its provider config names a `gcs_address`, not tried here), so the head
takes that port and the test refuses to start if anything else holds it. Everything started here is
stopped by its own process ids; its own HOME keeps ~/.ray/auth_token (token auth) out.

`ObjectStore` is moto's S3 server as a process of its own (`moto_server`), killed to make storage unreachable.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from reteq.sweep.cluster_fit import node_types

BIN = Path(sys.executable).parent
GCS_PORT = 6379  # the fake provider's workers join GCS here and only here
FAKE_HEAD = "ray.head.default"  # the fake provider's name for the head's type
NODE_ID_VAR = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"  # set by the fake provider on each worker raylet it starts
TYPE_VAR = "RAY_NODE_TYPE_NAME"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def fake_cluster(cluster_file: Path, *, max_workers: int = 2, idle_minutes: float = 0.25,
                 head_cpus: int = 1, worker_cpus: int = 1) -> dict:
    """cluster.yaml's node types for the fake provider: the head keeps only `head_cpus` (the bookkeeping: the
    launcher, Tune's trial drivers), each GPU type becomes a `worker_cpus`-CPU stand-in with its custom resources
    (GPU dropped: nothing here has one) and at most `max_workers` nodes, as does the cluster."""
    types = {}
    for t in node_types(cluster_file):
        custom = {k: v for k, v in t.resources.items() if k not in ("CPU", "GPU")}
        if t.head:
            types[FAKE_HEAD] = {"resources": {"CPU": head_cpus, **custom}, "node_config": {}, "max_workers": 0}
        else:
            types[t.name] = {"resources": {"CPU": worker_cpus, **custom}, "node_config": {}, "min_workers": 0,
                             "max_workers": min(t.max_workers, max_workers)}
    return {"cluster_name": "reteq-fake", "max_workers": max_workers, "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_minutes, "head_node_type": FAKE_HEAD, "available_node_types": types,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True},
            "auth": {"ssh_user": "ubuntu"}, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [], "rsync_exclude": [], "rsync_filter": []}


class ObjectStore:
    """moto's S3 server on 127.0.0.1 (a process of its own) with one bucket."""

    def __init__(self, log: Path, bucket: str = "reteq-test"):
        self.port, self.bucket, self.log = free_port(), bucket, log
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """What boto3, pyarrow (Ray storage) and MLflow's S3 artifact store need to use it."""
        return {**S3_KEYS, "AWS_ENDPOINT_URL": self.endpoint, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def start(self) -> ObjectStore:
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not port_in_use(self.port):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-2000:]
            time.sleep(0.2)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **{k.lower(): v for k, v in S3_KEYS.items()
                                                                 if k != "AWS_DEFAULT_REGION"},
                            region_name=S3_KEYS["AWS_DEFAULT_REGION"])

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class Seen:
    """Worker nodes seen alive (node id -> type, first and last time seen), polled from the process table."""

    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    most_at_once: int = 0


class Head:
    """A Ray head with the fake provider's autoscaler, in `temp` (short: socket paths have a length limit)."""

    def __init__(self, config: dict, env: dict[str, str], home: Path):
        self.config, self.home = config, home
        self.temp = Path(tempfile.mkdtemp(prefix="ras", dir="/tmp"))
        self.dashboard = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"
        drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI", "RETEQ_HOME")
        self.env = {**{k: v for k, v in os.environ.items() if k not in drop}, **env, "HOME": str(home),
                    "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_FAKE_CLUSTER": "1",
                    "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    # a killed raylet is declared dead in ~3 s (defaults: ~15-30 s), so its tasks retry sooner
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    "RAY_health_check_initial_delay_ms": "1000",
                    "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10"}  # a node silent this long is terminated (30)
        self.seen = Seen()
        self._watching = False

    def start(self) -> Head:
        assert not port_in_use(GCS_PORT), f"port {GCS_PORT} is taken: the fake provider's workers need it"
        self.home.mkdir(parents=True, exist_ok=True)
        config = self.temp / "cluster.yaml"
        config.write_text(yaml.safe_dump(self.config))
        head = self.config["available_node_types"][FAKE_HEAD]["resources"]
        cmd = [str(BIN / "ray"), "start", "--head", f"--port={GCS_PORT}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={head['CPU']}", "--num-gpus=0", f"--autoscaling-config={config}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
               "--disable-usage-stats", f"--temp-dir={self.temp}"]
        cmd += [f"--{name}-port={free_port()}" for name in (  # the session's own cluster holds Ray's defaults
            "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent", "metrics-export",
            "ray-client-server")]
        started = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, (started.stdout + started.stderr)[-3000:]
        self._watching = True
        threading.Thread(target=self._watch, daemon=True, name="watch-workers").start()
        for _ in range(90):  # the job agent answers a few seconds after `ray start`
            if self.ray("job", "list").returncode == 0:
                break
            time.sleep(1)
        return self

    def ray(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env={**self.env, "RAY_ADDRESS": self.address},
                              capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent)

    def workers(self) -> dict[str, psutil.Process]:
        """node id -> raylet process of each live fake worker node of this head."""
        out = {}
        for p in self._ours():
            try:
                if p.name() == "raylet" and TYPE_VAR in (env := p.environ()):  # the head's has no type
                    out[env[NODE_ID_VAR]] = p
                    self.seen.types[env[NODE_ID_VAR]] = env.get(TYPE_VAR, "?")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out

    def _watch(self) -> None:
        while self._watching:
            now, alive = time.monotonic(), self.workers()
            for node in alive:
                self.seen.first.setdefault(node, now)
                self.seen.last[node] = now
            self.seen.most_at_once = max(self.seen.most_at_once, len(alive))
            time.sleep(0.5)

    def node_of(self, pid: int) -> str | None:
        """The worker node whose raylet is an ancestor of process `pid` (None: the head, or gone)."""
        raylets = {p.pid: node for node, p in self.workers().items()}
        try:
            for parent in psutil.Process(pid).parents():
                if parent.pid in raylets:
                    return raylets[parent.pid]
        except psutil.NoSuchProcess:
            pass
        return None

    def preempt(self, node: str) -> None:
        """A spot reclaim: SIGKILL the node's raylet and every process under it, with no warning."""
        raylet = self.workers()[node]
        doomed = [raylet, *raylet.children(recursive=True)]
        for p in doomed:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(doomed, timeout=10)

    def _ours(self) -> set[psutil.Process]:
        """Every process of this head: those naming its temp dir, and everything under them (the monitor's
        worker raylets, their workers)."""
        procs = set()
        for p in psutil.process_iter(["cmdline"]):
            if any(str(self.temp) in c for c in p.info["cmdline"] or []):
                procs.add(p)
                try:
                    procs.update(p.children(recursive=True))
                except psutil.NoSuchProcess:
                    pass
        return procs

    def stop(self) -> None:
        self._watching = False
        procs = list(self._ours())
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp, ignore_errors=True)
