"""What every Ray process of a sweep shares: the parsed config, the worker context, the parent checkpoint.

A node task or a leaf trial receives `settings` (a SweepRun: the sweep's settings, put in the object store once) and
builds its state from it. Ray reuses worker processes (and Tune reuses trial actors), so the parsed config,
plan and data are cached per process: the second task in a process pays nothing for them.

Test hooks (reteq.environment.PID_DIR, FAULT_NODE; read in the task; for fault-injection tests only):
  RETEQ_PID_DIR=DIR        each node task (or a node's rank-0 Train worker) writes DIR/<node key>.pid at start
  RETEQ_FAULT_NODE=ORDER   the node whose stage prefix is ORDER (e.g. "inst>U") raises, every attempt
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from reteq import environment
from reteq import tracking as T
from reteq.config import parse_config
from reteq.errors import ReteqError
from reteq.plan import build_plan
from reteq.sweep.lifecycle import close_trial_runs
from reteq.sweep.settings import SweepRun

# Imports inside functions below are the heavy ones (torch through reteq.pipeline / reteq.train, MLflow through
# record and delivery, Ray Train): a Tune trial imports this module and must stay a light process.

_CACHE: dict[str, tuple] = {}  # config digest -> (cfg, plan, DataCache), per process


class NodeFailed(ReteqError, RuntimeError):
    """A stage node could not be trained; `key` names it (and leaves below it report it)."""

    def __init__(self, key: str, message: str):
        super().__init__(key, message)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return self.message


def release_memory() -> None:
    """Give a finished node's or leaf's memory back to the OS before this warm worker takes its next task.

    Each task loads the base model again (538 MB in fp32 for SmolLM2-135M, plus theta_r and merged copies), and
    glibc keeps freed blocks in its arenas: on configs/smol.yaml a warm worker grew from 2.9 to 7.1 GB over five
    leaves, and two such lanes would outgrow a 16 GB laptop. malloc_trim returns the free arena pages."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def plan_of(settings: SweepRun):
    """(cfg, plan) for this sweep, parsed once per process; imports neither torch nor MLflow (a Tune trial that
    only drives a task or a trainer stays a light process)."""
    environment.apply_worker_env({**settings.env, **(ray.get(settings.secrets) if settings.secrets else {})})
    digest = settings.digest
    if digest not in _CACHE:
        cfg = parse_config(settings.config, source=settings.config_name, max_leaves=None)  # the driver checked
        _CACHE.clear()
        _CACHE[digest] = (cfg, build_plan(cfg), None)
    return _CACHE[digest][:2]


def state(settings: SweepRun):
    """(cfg, plan, data) for this sweep, built once per process."""
    cfg, plan = plan_of(settings)
    digest = settings.digest
    if _CACHE[digest][2] is None:
        # lazy: a Tune trial imports this module and stays light (no torch, no MLflow)
        from reteq.pipeline import DataCache

        _CACHE[digest] = (cfg, plan, DataCache(cfg))
    return _CACHE[digest]


def deepspeed_config(settings: SweepRun) -> dict[str, Any] | None:
    # lazy: a Tune trial imports this module and stays light (reteq.train.engine pulls in torch)
    from reteq.train.engine import load_deepspeed_config

    return load_deepspeed_config(settings.deepspeed) if settings.deepspeed else None


def in_process(cfg, ds: dict[str, Any] | None) -> bool:
    """True when one CPU worker and a DeepSpeed config with nothing to do (ZeRO-0, fp32, no clipping): the
    work then runs in the task or trial itself with plain torch, the same arithmetic without a worker group,
    a process group or `import deepspeed`. Multi-worker and GPU work keeps Ray Train + DeepSpeed."""
    # lazy: a Tune trial imports this module and stays light (reteq.train.engine pulls in torch)
    from reteq.train.engine import deepspeed_needed

    ex = cfg.execution
    return ex.workers == 1 and not ex.use_gpu and not deepspeed_needed(ds)


@dataclass(frozen=True)
class Rank:
    """Which worker of a group this process is (the defaults: the only one, plain torch)."""

    rank: int = 0
    world: int = 1
    ds: dict[str, Any] | None = None  # DeepSpeed config; None: plain torch
    local_rank: int = 0  # Train's local rank; worker_context recounts it by Ray node id (machine_local_rank)


def worker_context(cfg, model: str, r: Rank):
    # lazy: a Tune trial imports this module and stays light (no torch, no MLflow)
    import torch

    # lazy: a Tune trial imports this module and stays light (no torch, no MLflow)
    from reteq.train.recipes import WorkerContext

    if cfg.execution.use_gpu and torch.cuda.is_available():
        # lazy: Ray Train/Tune internals only where used; planning and light processes skip them
        from ray.train.torch import get_device

        device = get_device()
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(cfg.execution.cpus_per_worker)))
    local_rank = machine_local_rank(r.rank, device) if r.world > 1 else r.local_rank
    return WorkerContext.for_model(cfg, model, rank=r.rank, world=r.world, device=device, ds_config=r.ds,
                                   local_rank=local_rank)


def machine_local_rank(rank: int, device) -> int:
    """This rank's index among the group's ranks on the same Ray node (so the same checkpoint store).

    Ray Train's own local rank groups workers by node IP, and two Ray nodes can share one (several nodes on one
    host, as in tests/test_two_nodes.py): the group would then have one local rank 0 for two stores, and the
    other node's ranks would load a checkpoint nobody fetched for them. The Ray node id is exact."""
    # lazy: a Tune trial imports this module and stays light (no torch, no MLflow)
    from reteq.train import collectives

    node = ray.get_runtime_context().get_node_id()
    nodes = collectives.all_gather_object(node, device)
    return nodes[:rank].count(node)


def mlflow_hooks(settings: SweepRun, cfg, key: str):
    """MLflow hooks for the node or leaf `key`; runs an earlier try of it left RUNNING (its process died and
    Ray or Tune retried it) are closed KILLED first, so one FINISHED run per key remains."""
    # lazy: a Tune trial imports this module and stays light (no torch, no MLflow)
    from reteq.sweep.record import MlflowHooks

    hooks = MlflowHooks(settings.tracking_uri, settings.experiment_id, settings.parent_run_id, cfg.name,
                        lambda stage: cfg.stage(stage).schedule, echo=lambda m: print(m, flush=True),
                        attempt=settings.attempt, trial=key)
    if settings.attempt:
        close_trial_runs(hooks.c, settings.experiment_id, settings.attempt, key, T.STATUS_KILLED,
                         "its process died; Ray retried it")
    return hooks


def store(settings: SweepRun):
    """This machine's checkpoint store; a node published on another machine is fetched from MLflow
    (reteq.sweep.delivery) by `ensure_local`, which every rank calls before loading it."""
    # lazy: a Tune trial imports this module and stays light (no torch, no MLflow)
    from reteq.pipeline import CheckpointStore
    from reteq.sweep.delivery import local_store_root, mlflow_fetcher

    return CheckpointStore(local_store_root(settings.checkpoints),
                           fetch=mlflow_fetcher(settings.tracking_uri, settings.experiment_id))


def warm_up() -> None:
    """Import what every in-process node and leaf needs (see launcher.Launcher.warm)."""
    from transformers.models.llama import modeling_llama  # noqa: F401  (the tiny model's; else loaded lazily)

    import reteq.pipeline  # noqa: F401  (torch, transformers)
    import reteq.sweep.record  # noqa: F401  (MLflow)


def test_hooks(node) -> None:
    """The fault-injection hooks described in the module docstring."""
    pid_dir = environment.get(environment.PID_DIR)
    if pid_dir:
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(pid_dir) / f"{node.key}.pid").write_text(json.dumps({"pid": os.getpid()}))
    if environment.get(environment.FAULT_NODE) == T.order_tag(node.prefix):
        raise RuntimeError(f"fault injected by RETEQ_FAULT_NODE into {T.order_tag(node.prefix)}")


def worker_group(settings: SweepRun, cfg, loop, loop_config: dict[str, Any], name: str, **run_config):
    """A TorchTrainer of `execution.workers` ranks, each running `loop(loop_config)` (a node's or a leaf's
    rank function), with Train's FailureConfig(execution.max_failures) and this sweep's worker env.
    `run_config`: what one kind adds (a node's checkpoint config, a leaf's Tune callback)."""
    # lazy: Ray Train/Tune internals only where used; planning and light processes skip them
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ex = cfg.execution
    resources = {"CPU": ex.cpus_per_worker, **ex.worker_resources, **({"GPU": ex.gpus_per_worker} if ex.use_gpu else {})}
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=ex.workers, use_gpu=ex.use_gpu, resources_per_worker=resources,
                                     placement_strategy=ex.placement),
        run_config=RunConfig(name=name, storage_path=settings.storage_path,
                             failure_config=FailureConfig(max_failures=ex.max_failures),
                             worker_runtime_env={"env_vars": settings.env}, **run_config),
    )


@contextmanager
def rank_run(settings: SweepRun, key: str, model: str, r: Rank, context=None) -> Iterator:
    """The RunContext one rank works in for node, leaf or record `key`: MLflow hooks on rank 0 (no-op hooks on
    the others), this machine's store, the cached data. Whatever the work raises, rank 0 first closes the runs
    it opened FAILED with the error. `context`: a WorkerContext to use instead of `worker_context`."""
    # lazy: a Tune trial imports this module and stays light (no torch, no MLflow)
    from reteq.pipeline import Hooks, RunContext

    cfg, plan, data = state(settings)
    hooks = mlflow_hooks(settings, cfg, key) if r.rank == 0 else Hooks()
    try:
        ctx = context or worker_context(cfg, model, r)
        yield RunContext(cfg, plan, ctx, store(settings), data, hooks)
    except BaseException as e:
        if r.rank == 0:
            hooks.fail_open_runs("".join(traceback.format_exception_only(type(e), e)).strip())
        raise
