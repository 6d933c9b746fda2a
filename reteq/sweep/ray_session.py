"""The driver's Ray session: started once per command (`reteq demo` shares one between the theory grid and the
sweep), quiet on the console, and with task workers warmed while the driver sets up MLflow."""

from __future__ import annotations

import logging
import os


def init_ray() -> bool:
    """Connect to RAY_ADDRESS (a cluster, or the job's own under `ray job submit`) when set; otherwise start a
    NEW local cluster on 127.0.0.1 (address="local": never attach to some other `ray start` on this machine).
    Returns whether this call started it (the caller then shuts it down).

    Workers' stdout/stderr stay in Ray's log files (log_to_driver=False): the console gets Tune's table and one
    line per node and leaf, without raylet / PreemptionWatcher / PlacementGroupCleaner warnings or each worker
    line twice. Where the logs are is printed once."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")  # read by Train controllers
    kwargs = {"log_to_driver": False, "logging_level": logging.WARNING, "configure_logging": True}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        # a new local cluster turns token auth on by itself and says so at WARNING level: not the user's concern
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **kwargs)
    print(f"Ray logs (workers, nodes, trials): {ray_log_dir()}", flush=True)
    return True


def ray_log_dir() -> str:
    try:
        from ray._private.worker import global_worker

        return global_worker.node.get_logs_dir_path()
    except Exception:  # a client connection has no local node: the logs are on the head
        return "on the Ray head node (ray job logs / the dashboard)"


def warm_task_workers(cpus_per_task: float, most: int = 8) -> None:
    """Start as many task workers as tasks of `cpus_per_task` fit, each importing what a node or leaf needs
    (torch, transformers, MLflow: 5-10 s per process on 2 cores) while the driver is still busy; Ray reuses
    idle task workers, so the first nodes and leaves find them warm. Fire and forget: nothing waits on them."""
    import ray

    from reteq.sweep.worker import warm_up

    lanes = min(most, int(ray.cluster_resources().get("CPU", 0) // max(cpus_per_task, 1e-3)))
    task = ray.remote(warm_up).options(num_cpus=cpus_per_task, name="warm-up")
    for _ in range(lanes):
        task.remote()
