"""One rank's work in a sweep: which worker it is (`Rank`), its WorkerContext (built here and nowhere else in
the sweep), and the RunContext it works in (`rank_run`: MLflow hooks, this machine's store, the cached data).

Test hooks (reteq.environment.PID_DIR, FAULT_NODE; read in the task; for fault-injection tests only):
  RETEQ_PID_DIR=DIR        each node task (or a node's rank-0 Train worker) writes DIR/<node key>.pid at start
  RETEQ_FAULT_NODE=ORDER   the node whose stage prefix is ORDER (e.g. "inst>U") raises, every attempt
"""

from __future__ import annotations

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
from reteq.sweep import process
from reteq.sweep.lifecycle import close_trial_runs
from reteq.sweep.settings import SweepRun

# Imports inside functions below are the heavy ones (torch through reteq.pipeline / reteq.train, MLflow through
# record and delivery, Ray Train): a Tune trial imports this module and must stay a light process.


@dataclass(frozen=True)
class Rank:
    """Which worker of a group this process is (the defaults: the only one, plain torch, in a Ray task)."""

    rank: int = 0
    world: int = 1
    ds: dict[str, Any] | None = None  # DeepSpeed config; None: plain torch
    local_rank: int = 0  # Train's local rank; worker_context recounts it by Ray node id (machine_local_rank)
    train_worker: bool = False  # a Ray Train worker (its GPU is Train's); else a task (its GPU: cuda:0)


def worker_context(cfg, model: str, r: Rank):
    """The WorkerContext of rank `r` working on `model`: its device (Train's GPU in a worker group; the task's
    own GPU in a one-process task, where Ray sets CUDA_VISIBLE_DEVICES and Train's get_device does not work;
    else the CPU, with `execution.cpus_per_worker` torch threads) and its machine-local rank."""
    # lazy: a Tune trial imports this module and stays light (no torch, no MLflow)
    import torch

    # lazy: a Tune trial imports this module and stays light (no torch, no MLflow)
    from reteq.train.worker_context import WorkerContext

    if cfg.execution.use_gpu and torch.cuda.is_available():
        if not r.train_worker:
            return WorkerContext.for_model(cfg, model, device=torch.device("cuda", 0))
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
    from reteq.pipeline.context import CheckpointStore
    from reteq.sweep.delivery import local_store_root, mlflow_fetcher

    return CheckpointStore(local_store_root(settings.checkpoints),
                           fetch=mlflow_fetcher(settings.tracking_uri, settings.experiment_id))


def test_hooks(node) -> None:
    """The fault-injection hooks described in the module docstring."""
    pid_dir = environment.get(environment.PID_DIR)
    if pid_dir:
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(pid_dir) / f"{node.key}.pid").write_text(json.dumps({"pid": os.getpid()}))
    if environment.get(environment.FAULT_NODE) == T.order_tag(node.prefix):
        raise RuntimeError(f"fault injected by RETEQ_FAULT_NODE into {T.order_tag(node.prefix)}")


@contextmanager
def rank_run(settings: SweepRun, key: str, model: str, r: Rank) -> Iterator:
    """The RunContext one rank works in for node, leaf or record `key`: MLflow hooks on rank 0 (no-op hooks on
    the others), this machine's store, the cached data. Whatever the work raises, rank 0 first closes the runs
    it opened FAILED with the error."""
    # lazy: a Tune trial imports this module and stays light (no torch, no MLflow)
    from reteq.pipeline.context import Hooks, RunContext

    cfg, plan, data = process.state(settings)
    hooks = mlflow_hooks(settings, cfg, key) if r.rank == 0 else Hooks()
    try:
        yield RunContext(cfg, plan, worker_context(cfg, model, r), store(settings), data, hooks)
    except BaseException as e:
        if r.rank == 0:
            hooks.fail_open_runs("".join(traceback.format_exception_only(type(e), e)).strip())
        raise
