"""Every Ray entry point of a sweep, in one module: what runs in another process, and every call that crosses
into one (`.remote`, `ray.get`, `ray.wait`, `ray.put`, a TorchTrainer, a Tune Tuner). The rest of reteq.sweep is
plain functions these call, so a reader follows the sweep with grep from here.

What runs remotely, by name:
- `node_task`: a Ray task per stage node (reteq.sweep.nodes); `node_group` / `node_worker_loop` when the node
  needs a worker group (more workers, GPUs, DeepSpeed);
- `record_task`: a Ray task per theta_r record (reteq.sweep.retrain_records);
- `leaf_trial`: the Tune trainable per unlearning leaf (reteq.sweep.leaves), a light process that drives either
  `leaf_task` (a streaming Ray task, in process) or `leaf_group` / `leaf_worker_loop` (a worker group);
- `Launcher`: the actor that submits node and record tasks and warms task workers (`warm_up`) from inside a
  placement group, so nodes and leaves share one pool of warm workers;
- `trace_with_ray_train` / `trace_worker_loop`: reteq.sweep.worlds' traces on Ray Train workers.
The driver side: `submit` (nodes and records), `tune_leaves` (the Tuner), `settled` (which node refs resolved),
`wait_all`, `wait_records`, `put`.

Every entry point starts with `_enter`: the sweep's worker env and MLflow credentials in this process's
environment (process.apply_env), then the cached (cfg, plan).

A Tune trial imports this module: it stays a light process (no torch, no MLflow); Ray Train, whose torch
integration (TorchTrainer) imports torch, is imported inside the functions that build a worker group.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from reteq import environment
from reteq import tracking as T
from reteq.config import SweepConfig, parse_config
from reteq.errors import NodeFailed
from reteq.resources import one_line
from reteq.sweep import leaves, nodes, process, retrain_records
from reteq.sweep.rank import Rank, worker_context
from reteq.sweep.ray_session import LAUNCHER_CPUS, TRIAL_DRIVER_CPUS, task_lanes, trial_runtime_env
from reteq.sweep.settings import SweepRun
from reteq.sweep.stage_resume import ParentRunParams, StageResume

HEAD_RESOURCE = "node:__internal_head__"  # Ray's resource of the head node (one unit, on the head only)


def _enter(settings: SweepRun):
    """First thing in every Ray entry point: the sweep's worker env (with the MLflow credentials, an object ref
    in `settings.secrets`) in this process, then (cfg, plan), cached per process."""
    process.apply_env(settings, ray.get(settings.secrets) if settings.secrets else {})
    return process.plan_of(settings)


def put(value) -> Any:
    """`value` in Ray's object store, once, for every process of the sweep -> its object ref."""
    return ray.put(value)


# ---- worker groups (Ray Train) ------------------------------------------------------------------------------------

def _torch_trainer():
    """Ray Train's TorchTrainer class, imported on first use: the one place this module imports it."""
    # lazy: Ray Train's torch integration imports torch; a Tune trial imports this module and stays light
    from ray.train.torch import TorchTrainer

    return TorchTrainer


def worker_group(settings: SweepRun, cfg, loop, loop_config: dict[str, Any], name: str, **run_config):
    """A TorchTrainer of `execution.workers` ranks, each running `loop(loop_config)` (a node's or a leaf's
    rank function), with Train's FailureConfig(execution.max_failures) and this sweep's worker env.
    `run_config`: what one kind adds (a node's checkpoint config, a leaf's Tune callback)."""
    TorchTrainer = _torch_trainer()  # noqa: N806  (a class, named as Ray names it)

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


def _train_rank_here(settings: SweepRun) -> Rank:
    """This Ray Train worker's Rank (its DeepSpeed config from the sweep's)."""
    c = ray.train.get_context()
    return Rank(c.get_world_rank(), c.get_world_size(), process.deepspeed_config(settings), c.get_local_rank(),
                train_worker=True)


# ---- stage nodes --------------------------------------------------------------------------------------------------

@ray.remote
def node_task(settings: SweepRun, key: str, parent: dict | None) -> dict[str, Any]:
    """One stage node, started by Ray once `parent` (the parent node's published checkpoint) exists: trained in
    this task (nodes.train_rank) or by a worker group (`node_group`)."""
    cfg, plan = _enter(settings)
    node = plan.nodes[key]
    try:
        if settings.in_process:
            return nodes.train_rank(settings, key, parent)
        trainer = node_group(settings, cfg, key, parent)
        started = time.time()
        return nodes.published_by_group(settings, key, trainer.fit(), started)
    except NodeFailed:
        raise
    except Exception as e:
        raise NodeFailed(key, f"{nodes.describe(node)} failed: {one_line(e)}") from e
    finally:
        process.release_memory()


def node_group(settings: SweepRun, cfg, key: str, parent: dict | None):
    """The worker group of `execution.workers` ranks that trains node `key` (each runs `node_worker_loop`)."""
    return worker_group(settings, cfg, node_worker_loop, {"settings": settings, "key": key, "parent": parent},
                        f"node-{key[:12]}", checkpoint_config=CheckpointConfig(num_to_keep=1))  # the last mid-stage


def node_worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker of a multi-worker / GPU node: nodes.train_rank on this rank."""
    settings = config["settings"]
    _enter(settings)
    cfg, _, _ = process.state(settings)
    r = _train_rank_here(settings)
    # DeepSpeed saves the state to resume from; plain torch workers (deepspeed: null) restart the stage
    digests = ParentRunParams(settings.tracking_uri, settings.parent_run_id)  # where checkpoint digests live
    resume = (StageResume.from_ray_train(config["key"], cfg.execution.checkpoint_every, r.rank, digests)
              if r.ds else None)
    ray.train.report(nodes.train_rank(settings, config["key"], config["parent"], r, resume))


def submit_nodes(cfg, plan, keys: list[str], settings_ref, done: dict[str, dict[str, str]], settings: SweepRun
                 ) -> dict[str, Any]:
    """key -> object ref of the node's published checkpoint: `ray.put` for nodes already in MLflow, a
    `node_task` for the rest (submitted parents first, so each task names its parent's ref)."""
    refs: dict[str, Any] = {}
    opts = nodes.task_options(cfg, settings)
    for key in keys:
        node = plan.nodes[key]
        if key in done:
            refs[key] = ray.put({"key": key, "path": done[key].get("checkpoint", ""),
                                 "run_id": done[key].get("run_id", ""), "published": 0.0})
            continue
        parent = refs[node.parent] if node.parent else None
        refs[key] = node_task.options(name=f"node-{T.order_tag(node.prefix)}", **opts).remote(settings_ref, key, parent)
    return refs


# ---- theta_r's records --------------------------------------------------------------------------------------------

@ray.remote
def record_task(settings: SweepRun, key: str, node: dict) -> dict[str, Any]:
    """Evaluate theta_r once its node (`node`: its published checkpoint) exists; log its retrain record."""
    _enter(settings)
    return retrain_records.evaluate_record(settings, key, node)


def submit_records(cfg, plan, records: list[str], settings_ref, node_refs: dict[str, Any], settings: SweepRun
                   ) -> dict[str, Any]:
    """record key -> ref of its `record_task`, which Ray starts once the theta_r node's ref resolves."""
    opts = retrain_records.task_options(cfg, settings)
    return {k: record_task.options(name=f"retrain-{T.order_tag(plan.records[k].order)}", **opts)
            .remote(settings_ref, k, node_refs[plan.records[k].node]) for k in records}


def wait_records(refs: dict[str, Any]) -> dict[str, str]:
    """Wait for every record task; record key -> error of those that failed (their node's, when it failed)."""
    failed: dict[str, str] = {}
    for key, ref in refs.items():
        try:
            ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the record or the node it evaluates failed: said per record
            failed[key] = retrain_records.failure_line(e)
    return failed


# ---- unlearning leaves --------------------------------------------------------------------------------------------

def leaf_trial(config: dict[str, Any], settings: SweepRun | None = None, parents: dict | None = None) -> None:
    """The Tune trainable: a light process (no torch, no MLflow) that drives the leaf's work and forwards its
    eval metrics to Tune. `config`: the leaf's key and axes (leaves.trial_config); `parents`: node key ->
    object ref of its published checkpoint."""
    started = time.time()  # reported with every result: tests check it against the parents' publish times
    cfg, plan = _enter(settings)
    leaf = leaves.leaf_of(plan, config)
    try:
        published = {k: ray.get(parents[k]) for k in nodes.leaf_dependencies(leaf)}
    except Exception as e:  # the searcher never suggests such a leaf; a resumed trial might meet one
        raise NodeFailed(leaf.parent, f"leaf {leaf.key[:8]}: a node it needs failed: {e}") from None
    if not settings.in_process:
        leaf_group(settings, cfg, leaf, config, published, started).fit()
        return
    # one CPU worker: the leaf runs as a task in Ray's pool of task workers, the same warm processes (torch,
    # transformers, MLflow imported; data, tokenizer cached) that trained the nodes; a Tune trial actor is a
    # fresh process that would pay all of that again. Tune retries the trial (max_failures) if the task dies.
    # "DEFAULT": outside the trial's placement group (one 0.05-CPU bundle), in the cluster's task pool
    task = leaf_task.options(num_cpus=settings.task_cpus, max_retries=0, scheduling_strategy="DEFAULT",
                             resources=dict(cfg.execution.worker_resources),  # the leaf's one worker: pinned there
                             runtime_env=settings.runtime_env, name=f"leaf-{T.order_tag(leaf.order)}-{leaf.algorithm}")
    for ref in task.remote(settings, dict(config), published, started):
        tune.report(ray.get(ref))


@ray.remote
def leaf_task(settings: SweepRun, config: dict[str, Any], published: dict[str, dict], started: float):
    """Unlearn one leaf in this task worker, yielding Tune's metrics at every eval step as they come
    (leaves.unlearn_streaming)."""
    _enter(settings)
    yield from leaves.unlearn_streaming(settings, config, published, started)


def leaf_group(settings: SweepRun, cfg, leaf, config: dict[str, Any], published: dict[str, dict], started: float):
    """A worker group of `execution.workers` ranks that unlearns the leaf (each runs `leaf_worker_loop`); rank
    0's `ray.train.report` reaches Tune through Train's TuneReportCallback."""
    return worker_group(settings, cfg, leaf_worker_loop,
                        {"settings": settings, "axes": dict(config), "parents": published, "started": started},
                        f"leaf-{leaf.key[:12]}", callbacks=[TuneReportCallback()])


def leaf_worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker of a multi-worker / GPU leaf: leaves.unlearn_rank on this rank."""
    settings = config["settings"]
    _enter(settings)
    leaves.unlearn_rank(settings, config["axes"], config["parents"], ray.train.report, config["started"],
                        _train_rank_here(settings))


def tune_leaves(cfg: SweepConfig, todo: list, settings: SweepRun, refs: dict[str, Any], searcher, callbacks: list):
    """The leaves as Tune trials of `leaf_trial` (handed out by `searcher`, dag.DagSearcher, once their nodes
    are published); Tune's ResultGrid."""
    trainable = tune.with_resources(tune.with_parameters(leaf_trial, settings=settings, parents=refs),
                                    {"cpu": TRIAL_DRIVER_CPUS})
    ex = cfg.execution
    space = {k: tune.choice(vals) for k, vals in leaves.axis_values(todo).items()}  # names the axes for the table
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(todo),
                                    max_concurrent_trials=ex.max_concurrent_trials, reuse_actors=True),
        run_config=tune.RunConfig(name=f"{cfg.name}-tune", storage_path=settings.storage_path,
                                  verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=ex.max_failures),
                                  callbacks=callbacks),
    )
    return tuner.fit()


# ---- the driver's side of the DAG ---------------------------------------------------------------------------------

def submit(cfg, plan, settings: SweepRun, keys: list[str], done: dict[str, dict], records: list[str], launcher=None
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The missing nodes among `keys` and the retrain `records`, submitted -> (node refs, record refs). By the
    `launcher` actor when given (one pool of warm workers with the leaves), else from here."""
    settings_ref = ray.put(settings)
    if launcher is not None:
        return ray.get(launcher.submit.remote(settings, keys, [settings_ref], done, list(records)))
    refs = submit_nodes(cfg, plan, keys, settings_ref, done, settings)
    return refs, submit_records(cfg, plan, list(records), settings_ref, refs, settings)


def settled(pending: dict[str, Any]) -> dict[str, tuple[Any, BaseException | None]]:
    """Of the `pending` refs (key -> ref), those that resolved, without waiting: key -> (value, None), or (None,
    the error) for a task that failed."""
    if not pending:
        return {}
    ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=0)
    ready_ids = {r.hex() for r in ready}
    out: dict[str, tuple[Any, BaseException | None]] = {}
    for key, ref in pending.items():
        if ref.hex() in ready_ids:
            try:
                out[key] = (ray.get(ref), None)
            except Exception as e:  # noqa: BLE001 - the node itself failed, or the node it continues from did
                out[key] = (None, e)
    return out


def wait_all(refs: dict[str, Any]) -> None:
    """Until every ref has resolved (or failed)."""
    ray.wait(list(refs.values()), num_returns=len(refs))


# ---- the launcher -------------------------------------------------------------------------------------------------

class Launcher:
    """Submits the node tasks and the warm-ups from inside a placement group, as Tune's trials submit the
    leaves' tasks. Measured on Ray 2.60: the tasks of a process in a placement group never reuse a worker that
    ran a task of the driver (they get a pool of their own), so node tasks submitted by the driver left the
    leaves to start cold workers (~15-30 s on 2 cores). Submitted from here, nodes, warm-ups and leaves share
    one pool of warm workers. It owns the node tasks (retries included) and lives as long as the sweep."""

    def warm(self, cpus_per_task: float, runtime_env: dict, resources: dict | None = None) -> int:
        """Start as many task workers as tasks of `cpus_per_task` fit, each importing what a node or leaf needs
        (torch, transformers, MLflow: 5-10 s per process on 2 cores) while the driver is still busy. Nothing
        waits on them. `resources`: execution.worker_resources, so they warm the nodes the work will use (on an
        autoscaling cluster they are also the first requests that make it launch one)."""
        lanes = task_lanes(cpus_per_task, ray.cluster_resources().get("CPU", 0))
        task = ray.remote(process.warm_up).options(num_cpus=cpus_per_task, name="warm-up", runtime_env=runtime_env,
                                                   scheduling_strategy="DEFAULT", resources=dict(resources or {}))
        self._warming = [task.remote() for _ in range(lanes)]
        return lanes

    def submit(self, settings: SweepRun, keys: list[str], settings_ref: list, done: dict, records: list[str]) -> tuple:
        """submit_nodes and submit_records, here -> (node refs, record refs). `settings_ref` comes in a list:
        the tasks get the ref, not its value."""
        cfg, plan = _enter(settings)
        refs = submit_nodes(cfg, plan, keys, settings_ref[0], done, settings)
        return refs, submit_records(cfg, plan, records, settings_ref[0], refs, settings)


def start_launcher(task_cpus: float, worker_resources: dict):
    """A Launcher actor in a placement group of its own (0.01 CPU), its task workers warming -> (actor,
    placement group). On the head node: it owns every node task, and a task whose owner dies is lost with it
    (its result and its retries), so the launcher must live where the driver lives, on the one node an
    autoscaler never removes or a spot market reclaims."""
    head = {HEAD_RESOURCE: 0.001} if HEAD_RESOURCE in ray.cluster_resources() else {}
    pg = placement_group([{"CPU": LAUNCHER_CPUS, **head}], name="reteq-launcher")
    ray.get(pg.ready())
    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=False)
    actor = ray.remote(Launcher).options(num_cpus=LAUNCHER_CPUS, scheduling_strategy=strategy, name=None,
                                         runtime_env=trial_runtime_env()).remote()
    actor.warm.remote(task_cpus, trial_runtime_env(), dict(worker_resources))
    return actor, pg


def stop_launcher(launcher) -> None:
    if launcher is not None:
        ray.kill(launcher[0])
        remove_placement_group(launcher[1])


# ---- results across worker counts (reteq.sweep.worlds) ------------------------------------------------------------

def trace_worker_loop(config: dict[str, Any]) -> None:
    """Every Ray Train worker: each job's trace (worlds.trace), in turn (one worker group for several ZeRO
    stages shares its start-up); the main rank writes each to its job's `out`."""
    # lazy: reteq.sweep.worlds runs the pipeline (torch); a Tune trial imports this module and stays light
    from reteq.sweep.worlds import engine_config, trace

    c = ray.train.get_context()
    cfg = parse_config(config["config"])
    for job in config["jobs"]:
        ds = engine_config(job["ds"], c.get_world_size(), cfg.execution.use_gpu)
        r = Rank(c.get_world_rank(), c.get_world_size(), ds, c.get_local_rank(), train_worker=True)
        ctx = worker_context(cfg, cfg.models[0].name, r)
        result = trace(cfg, ctx, job["store"], job.get("algorithms"))
        if ctx.is_main:
            Path(job["out"]).write_text(json.dumps(result))


def trace_with_ray_train(cfg: SweepConfig, workers: int, jobs: list[dict[str, Any]], storage: str | Path,
                         name: str = "worlds") -> list[dict[str, Any]]:
    """One TorchTrainer of `workers` ranks (each `execution.cpus_per_worker` CPUs, GPUs when execution.use_gpu)
    runs every job ({"ds": DeepSpeed config or None, "store": checkpoint store, "out": JSON path, optionally
    "algorithms": the leaves to run}); returns the jobs' traces. Needs a running Ray (ray.init)."""
    TorchTrainer = _torch_trainer()  # noqa: N806  (a class, named as Ray names it)

    ex = cfg.execution
    resources = {"CPU": ex.cpus_per_worker, **({"GPU": ex.gpus_per_worker} if ex.use_gpu else {})}
    TorchTrainer(trace_worker_loop, train_loop_config={"config": cfg.model_dump(mode="json"), "jobs": jobs},
                 scaling_config=ScalingConfig(num_workers=workers, use_gpu=ex.use_gpu, resources_per_worker=resources),
                 run_config=RunConfig(name=name, storage_path=str(storage),
                                      worker_runtime_env={"env_vars": environment.worker_env()})).fit()
    return [json.loads(Path(job["out"]).read_text()) for job in jobs]
