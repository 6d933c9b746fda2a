"""`SweepRun`: what every Ray process of one sweep attempt needs to know, decided once on the driver.

Why one frozen object rather than a dict: a node task, a leaf trial, a retrain record task and every Ray Train
worker read these settings, in different processes, and some are decisions only the driver can make (whether
work runs in process, a task's CPU request, the runtime env that keeps one pool of warm workers). Typed fields
say what exists; frozen says no process changes them. It pickles through Ray (plain fields, dicts of str).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SweepRun:
    config: dict[str, Any]  # the sweep config as JSON (cfg.model_dump(mode="json")); parsed once per process
    config_name: str  # where the config came from, for error messages
    digest: str  # cfg.digest(): the per-process cache key of (cfg, plan, data)
    tracking_uri: str
    experiment_id: str
    parent_run_id: str  # the sweep's MLflow parent run
    checkpoints: str  # the driver's checkpoint store (a machine may use its own: environment.CHECKPOINT_STORE)
    storage_path: str  # Ray Tune / Train run state
    deepspeed: str | None  # absolute path of the DeepSpeed JSON, or None
    in_process: bool  # one CPU worker, ZeRO-0: nodes and leaves run in a task with plain torch (process.in_process)
    task_cpus: float  # an in-process task's CPU request (ray_session.task_cpus)
    runtime_env: dict[str, Any] = field(default_factory=dict)  # Tune's trial env, computed on the driver
    env: dict[str, str] = field(default_factory=dict)  # environment.worker_env(), applied in every worker
    attempt: str = ""  # this `reteq sweep` process (lifecycle.new_attempt): who started a run
    # MLflow credentials (MLFLOW_TRACKING_USERNAME / _PASSWORD, from the driver's environment or taken out of an
    # http tracking_uri by reteq.redact.tracking_credentials): an object ref of their dict, set in each worker's
    # process environment by remote._enter (process.apply_env). A ref, not the values: Tune pickles its trainable's parameters into
    # the run's state (tuner.pkl) in storage_path, and a Ray runtime_env is recorded in Ray's logs
    secrets: Any = None
