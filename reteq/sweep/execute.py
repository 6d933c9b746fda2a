"""Ray Tune trials of Ray Train worker groups: one trial per unlearning leaf.

Ray 2.60 (Train V2): a Tune trial is a function that builds and fits a TorchTrainer; the trainer's workers run
`pipeline.run_leaf` under DeepSpeed (or plain torch), training the missing stage nodes of the leaf's order first. Workers
report the leaf's final metrics through `ray.train.report`, which TuneReportCallback forwards to Tune.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

from reteq import tracking as T
from reteq.config import SweepConfig

TRIAL_CPUS = 0.05  # the trial function only waits on its trainer; Ray refuses 0


def worker_env() -> dict[str, str]:
    """The driver's environment variables that trial workers need (Ray, HF, DeepSpeed, MLflow), quieted."""
    keep = ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "RETEQ_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN", "DS_ACCELERATOR",
            "TORCH_EXTENSIONS_DIR", "MLFLOW_TRACKING_URI", "PYTHONPATH")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")  # busy small machines start workers slowly
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    return env


def worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker of a trial."""
    import ray.train
    import torch

    from reteq.config import parse_config
    from reteq.pipeline import CheckpointStore, Coordinator, DataCache, Hooks, RunContext, run_leaf
    from reteq.plan import build_plan, leaf_from_dict
    from reteq.sweep.coordinator import RayCoordinator
    from reteq.sweep.delivery import local_store_root, mlflow_fetcher
    from reteq.sweep.record import MlflowHooks
    from reteq.train.engine import load_deepspeed_config
    from reteq.train.recipes import WorkerContext

    os.environ.update(config["env"])
    ctx_train = ray.train.get_context()
    rank, world = ctx_train.get_world_rank(), ctx_train.get_world_size()
    cfg = parse_config(config["config"], source=config["config_name"])
    leaf = leaf_from_dict(config["leaf"])
    plan = build_plan(cfg)
    use_gpu = cfg.execution.use_gpu and torch.cuda.is_available()
    if use_gpu:
        from ray.train.torch import get_device

        device = get_device()
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(cfg.execution.cpus_per_worker)))
    ds = load_deepspeed_config(config["deepspeed"]) if config["deepspeed"] else None
    ctx = WorkerContext(rank=rank, world=world, device=device, ds_config=ds, dtype=cfg.model(leaf.model).dtype,
                        packing=cfg.execution.packing, local_rank=ctx_train.get_local_rank())
    # this machine's store; nodes published on other machines come from MLflow (reteq.sweep.delivery)
    store = CheckpointStore(local_store_root(config["checkpoints"]),
                            fetch=mlflow_fetcher(config["tracking_uri"], config["experiment_id"]))

    hooks = None
    coordinator = None
    if rank == 0:
        def schedule_of(stage: str) -> str:
            return cfg.stage(stage).schedule

        hooks = MlflowHooks(config["tracking_uri"], config["experiment_id"], config["parent_run_id"], cfg.name,
                            schedule_of, echo=lambda m: print(m, flush=True), attempt=config.get("attempt", ""),
                            trial=leaf.key)
        _close_trial_runs(config, leaf.key, T.STATUS_KILLED, "its worker group died; the trial started a new one")
        coordinator = RayCoordinator(who=leaf.key, fetch=_fetch_checkpoint(config["tracking_uri"]),
                                     run_ids=hooks.run_ids)
    try:
        run = RunContext(cfg, plan, ctx, store, DataCache(cfg), coordinator or Coordinator(), hooks or Hooks())
        result = run_leaf(run, leaf)
    except BaseException as e:
        if hooks is not None:
            hooks.fail_open_runs("".join(traceback.format_exception_only(type(e), e)).strip())
        raise
    final = result.evals[-1][1] if result.evals else {}
    metrics = {k.replace("/", "_"): v for k, v in final.items()}
    metrics.update({"collapsed": float(result.collapsed), "steps": result.steps})
    ray.train.report(metrics)


def _fetch_checkpoint(tracking_uri: str):
    """Download a node's checkpoint artifact into the local store (for workers on another machine)."""

    def fetch(key: str, run_id: str, target: Path) -> Path | None:
        from reteq.sweep.mlflow_store import tracking_client as client
        from reteq.sweep.repair import fetch_node_checkpoint

        return fetch_node_checkpoint(client(tracking_uri), key, run_id, target)

    return fetch


def _close_trial_runs(base: dict[str, Any], trial: str, status: str, reason: str) -> None:
    """Runs this trial left RUNNING end with `status` and the reason (a dead worker cannot close its own)."""
    from reteq.sweep.lifecycle import close_trial_runs
    from reteq.sweep.mlflow_store import tracking_client as client

    if base.get("attempt"):
        close_trial_runs(client(base["tracking_uri"]), base["experiment_id"], base["attempt"], trial, status,
                         reason)


def make_trial(base: dict[str, Any], cfg: SweepConfig):
    """The Tune trial function: build a TorchTrainer for this leaf and fit it."""

    def trial(tune_config: dict[str, Any]) -> None:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        ex = cfg.execution
        resources = {"CPU": ex.cpus_per_worker, **ex.worker_resources}
        if ex.use_gpu:
            resources["GPU"] = ex.gpus_per_worker
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={**base, "leaf": tune_config["leaf"]},
            scaling_config=ScalingConfig(num_workers=ex.workers, use_gpu=ex.use_gpu, resources_per_worker=resources,
                                         placement_strategy=ex.placement),
            run_config=RunConfig(name=f"leaf-{tune_config['leaf']['key'][:12]}", storage_path=base["storage_path"],
                                 callbacks=[TuneReportCallback()],
                                 worker_runtime_env={"env_vars": base["env"]}),
        )
        try:
            trainer.fit()
        except BaseException as e:
            _close_trial_runs(base, tune_config["leaf"]["key"], T.STATUS_FAILED,
                              "".join(traceback.format_exception_only(type(e), e)).strip())
            raise

    return trial


def run_trials(cfg: SweepConfig, leaves: list[dict], base: dict[str, Any], finished_nodes: dict) -> Any:
    """Start the node registry, run every leaf as a Tune trial, return the ResultGrid."""
    import ray
    from ray import tune

    from reteq.sweep.coordinator import ACTOR_NAME, NodeRegistry

    registry = NodeRegistry.options(name=ACTOR_NAME, lifetime=None, get_if_exists=False).remote(finished_nodes)
    try:
        trainable = tune.with_resources(make_trial(base, cfg), {"cpu": TRIAL_CPUS})
        tuner = tune.Tuner(
            trainable,
            param_space={"leaf": tune.grid_search(leaves)},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.execution.max_concurrent_trials,
                                        reuse_actors=False),
            run_config=tune.RunConfig(name=f"{cfg.name}-tune", storage_path=base["storage_path"], verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        return tuner.fit()
    finally:
        ray.kill(registry)


def check_resources(cfg: SweepConfig) -> None:
    """Fail fast when a trial can never be scheduled (Ray would leave it PENDING forever)."""
    import ray

    total = ray.cluster_resources()
    ex = cfg.execution
    need_cpu = ex.workers * ex.cpus_per_worker + TRIAL_CPUS
    if not ex.use_gpu and total.get("CPU", 0) < need_cpu:
        raise RuntimeError(f"execution: a trial needs {need_cpu:g} CPUs ({ex.workers} workers x "
                           f"{ex.cpus_per_worker:g} + trial), the cluster has {total.get('CPU', 0):g}")
    if ex.use_gpu and total.get("GPU", 0) < ex.workers * ex.gpus_per_worker and not _autoscaling():
        raise RuntimeError(f"execution: a trial needs {ex.workers * ex.gpus_per_worker:g} GPUs, the cluster has "
                           f"{total.get('GPU', 0):g} (and no autoscaler)")


def _autoscaling() -> bool:
    return bool(os.environ.get("RAY_ADDRESS")) or os.environ.get("RETEQ_AUTOSCALING") == "1"
