"""The driver's Ray session: started once per command (`reteq demo` shares one between the theory grid and the
sweep), quiet on the console, and with task workers warmed while the driver sets up MLflow."""

from __future__ import annotations

import logging
import os

from reteq import environment

# ray is imported inside functions: commands that never start Ray (theory report, plan) import this module.


def init_ray(keep_workers: int = 0) -> bool:
    """Connect to RAY_ADDRESS (a cluster, or the job's own under `ray job submit`) when set; otherwise start a
    NEW local cluster on 127.0.0.1 (address="local": never attach to some other `ray start` on this machine).
    Returns whether this call started it (the caller then shuts it down).

    Workers' stdout/stderr stay in Ray's log files (log_to_driver=False): the console gets Tune's table and one
    line per node and leaf, without raylet / PreemptionWatcher / PlacementGroupCleaner warnings or each worker
    line twice. Where the logs are is printed once.

    keep_workers: how many idle worker processes a new local cluster keeps (Ray's default is one per CPU and it
    kills idle ones above that within a second: with Tune's trial actors alive, the warm task workers that
    trained the nodes would die just before the leaves need them, and each leaf lane would start cold)."""
    # lazy: keeps Ray out of `import reteq.theory` and the CLI's startup
    import ray

    if ray.is_initialized():
        return False
    environment.ray_driver_defaults()
    kwargs = {"log_to_driver": False, "logging_level": logging.WARNING, "configure_logging": True}
    if environment.ray_address():
        ray.init(**kwargs)
    else:
        # a new local cluster turns token auth on by itself and says so at WARNING level: not the user's concern
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        system = {"num_workers_soft_limit": keep_workers} if keep_workers > (os.cpu_count() or 1) else {}
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, _system_config=system,
                 **kwargs)
    print(f"Ray logs (workers, nodes, trials): {ray_log_dir()}", flush=True)
    return True


def ray_log_dir() -> str:
    try:
        # lazy: Ray Train/Tune internals only where used; planning and light processes skip them
        from ray._private.worker import global_worker

        return global_worker.node.get_logs_dir_path()
    except Exception:  # a client connection has no local node: the logs are on the head
        return "on the Ray head node (ray job logs / the dashboard)"


LAUNCHER_CPUS = 0.01  # the Launcher actor's placement group (reteq.sweep.remote.Launcher)
TRIAL_DRIVER_CPUS = 0.05  # a Tune trial that only drives a task or a TorchTrainer; Ray refuses 0


def task_cpus(cpus_per_worker: float, trials: int, cluster_cpus: float) -> float:
    """The CPUs an in-process node, leaf or retrain-record task asks Ray for.

    The bookkeeping processes hold a sliver of CPU each (the launcher 0.01, each running trial 0.05), so two
    1-CPU tasks no longer fit on 2 cores beside them and every stage node ran after the other (seen with
    SmolLM2: 8 nodes of two independent chains strictly in turn). A task asks for its share of what is left
    when that is less; its torch threads still follow cpus_per_worker (reteq.sweep.rank.worker_context). A cluster that has
    not yet grown to hold one task (an autoscaler's head) gets the request as configured."""
    lanes = task_lanes(cpus_per_worker, cluster_cpus)
    share = (cluster_cpus - LAUNCHER_CPUS - TRIAL_DRIVER_CPUS * trials) / lanes
    if cluster_cpus < cpus_per_worker or share < cpus_per_worker / 2:
        return cpus_per_worker
    return round(min(cpus_per_worker, share), 3)


def task_lanes(cpus_per_task: float, cpus: float, most: int = 8) -> int:
    """How many tasks of `cpus_per_task` run side by side on `cpus` (at most `most`)."""
    return max(1, min(most, int(cpus // max(cpus_per_task, 1e-3))))


def workers_to_keep(cpus_per_task: float, trials: int) -> int:
    """Idle workers a local cluster keeps: the task lanes, the trial actors, and two for Tune's own."""
    return task_lanes(cpus_per_task, os.cpu_count() or 1) + trials + 2


def trial_runtime_env() -> dict:
    """The runtime env Ray Tune gives its trial actors (ray.tune.execution.class_cache), which their child tasks
    inherit. Ray keeps one pool of worker processes per runtime env, so node tasks, warm-up tasks and the tasks
    a trial starts all carry this one. Computed on the driver only: a trial's own environment holds variables
    Tune sets, which would make another env."""
    # lazy: Ray Train/Tune internals only where used; planning and light processes skip them
    from ray.tune.execution.class_cache import DEFAULT_ENV_VARS, ENV_VARS_TO_PROPAGATE

    return {"env_vars": environment.tune_trial_env(DEFAULT_ENV_VARS, ENV_VARS_TO_PROPAGATE)}
