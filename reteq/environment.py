"""Process environment's one home: every variable reteq sets, and every RETEQ_* variable it reads.

Why one module: Ray, MLflow, tokenizers and DeepSpeed read their settings from the environment, at import or
when a worker starts, so where a variable is set decides who sees it (the driver, a Ray task worker, a Train
worker). Setting them here, through a few named functions, makes that visible and keeps the driver and its
workers agreeing; tests/test_homes.py fails on an `os.environ[...] =`, `setdefault`, `update`, `pop` or
`putenv` anywhere else in reteq/, and on a RETEQ_* variable read anywhere else.

Nothing here overrides a value the user set: defaults go in with `setdefault`.
"""

from __future__ import annotations

import os
from pathlib import Path

# ---- reteq's own variables --------------------------------------------------------------------------------------
CACHE = "RETEQ_CACHE"  # what reteq builds once per machine (the tiny model, an empty MLflow schema)
DATA_DIR = "RETEQ_DATA_DIR"  # prepared data shared by every sweep on this machine
HOME = "RETEQ_HOME"  # where a relative work dir lives
CHECKPOINT_STORE = "RETEQ_CHECKPOINT_STORE"  # this machine's checkpoint store (e.g. a local NVMe folder)
AUTOSCALING = "RETEQ_AUTOSCALING"  # "1": the cluster grows on demand, so a missing GPU is no error yet
# a file read instead of /proc/cpuinfo for the CPU's flags (reteq.hardware): a head whose CPU workers are another
# machine type can point at theirs; tests use it to show what a CPU without bf16 units gets
CPUINFO = "RETEQ_CPUINFO"

# test hooks: only fault-injection and scheduling tests set these; a real run never should
PID_DIR = "RETEQ_PID_DIR"  # each node task writes DIR/<node key>.pid at start (reteq.sweep.rank.test_hooks)
FAULT_NODE = "RETEQ_FAULT_NODE"  # the node whose stage prefix is this raises, every attempt
FAULT = "RETEQ_FAULT"  # POINT[:N[:WHO]]: SIGKILL at a named point (reteq.sweep.faults)
FAULT_MARK = "RETEQ_FAULT_MARK"  # a file created when the fault fires; while it exists the fault stays off
DRIVER_PID = "RETEQ_DRIVER_PID"  # the `reteq sweep` process a `driver` fault kills

FAULT_VARS = (FAULT, FAULT_MARK, DRIVER_PID)

# what every Ray task, trial and Train worker of a sweep gets from the driver (when set there)
_WORKER_KEEP = ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", CACHE, "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                "HF_TOKEN", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "MLFLOW_TRACKING_URI", "PYTHONPATH", PID_DIR,
                FAULT_NODE, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
_QUIET = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
_APPLIED: dict[str, str] = {}  # the variables the last sweep's worker env set in this (reused) process


def get(name: str, default: str | None = None) -> str | None:
    """A RETEQ_* variable (one of the names above)."""
    return os.environ.get(name, default)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE, Path.home() / ".cache" / "reteq"))


def ray_address() -> str | None:
    """RAY_ADDRESS: a cluster to join (or the job's own under `ray job submit`); None: start a local one."""
    return os.environ.get("RAY_ADDRESS") or None


def autoscaling() -> bool:
    return bool(ray_address()) or os.environ.get(AUTOSCALING) == "1"


def command_defaults() -> None:
    """The `reteq` command, before anything imports Ray or MLflow: telemetry and progress bars off, tokenizers
    single-threaded (Ray forks), a local cluster's traffic on 127.0.0.1 (Ray reads this at import)."""
    if not ray_address():
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for k, v in {**_QUIET, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar per artifact the report reads
                 "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)


def telemetry_off() -> None:
    """Ray's usage stats and MLflow's telemetry off in this process (the theory grid, its trials)."""
    for k, v in _QUIET.items():
        os.environ.setdefault(k, v)


def ray_driver_defaults() -> None:
    """Before ray.init: no usage stats, and Train controllers wait up to 10 min for a worker group (busy small
    machines start workers slowly)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")


def mark_fault_driver() -> None:
    """A `driver` fault (reteq.sweep.faults) kills this process: name it, when a fault is set."""
    if os.environ.get(FAULT):
        os.environ.setdefault(DRIVER_PID, str(os.getpid()))


def fault_env() -> dict[str, str]:
    """The fault variables to hand to Ray workers (empty when no fault is set)."""
    return {k: os.environ[k] for k in FAULT_VARS if os.environ.get(k)}


def worker_env() -> dict[str, str]:
    """Variables every task, trial and Train worker needs, computed on the driver (applied in the worker by
    `apply_worker_env`: no per-task runtime_env, so every task shares one pool of warm workers)."""
    env = {k: os.environ[k] for k in _WORKER_KEEP if k in os.environ}
    env.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")  # busy small machines start workers slowly
    env.update({**_QUIET, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    return {**env, **fault_env()}


def apply_worker_env(env: dict[str, str]) -> None:
    """This sweep's variables, and none left over from an earlier sweep this (reused, warm) process ran: a
    fault hook of one test must not fire in the next sweep."""
    for k in _APPLIED.keys() - env.keys():
        os.environ.pop(k, None)
    os.environ.update(env)
    _APPLIED.clear()
    _APPLIED.update(env)


def tune_trial_env(default: dict[str, str], propagate) -> dict[str, str]:
    """Ray Tune's trial env: its defaults plus the driver's values of the variables it propagates."""
    return {**default, **{k: os.environ[k] for k in sorted(propagate) if k in os.environ}}


TRACKING_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # MLflow's basic-auth client


def export_tracking_credentials(credentials: dict[str, str]) -> dict[str, str]:
    """Set the MLflow credentials taken out of a tracking URI (reteq.redact.tracking_credentials) in this
    process, where MLflow's client reads them; return every one this process now holds (also those its
    environment had already), for the sweep's workers (reteq.sweep.settings.SweepRun.secrets)."""
    os.environ.update(credentials)
    return {k: os.environ[k] for k in TRACKING_CREDENTIALS if k in os.environ}
