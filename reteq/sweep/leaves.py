"""Unlearning leaves as Ray Tune trials over named axes.

A trial's config is the leaf's axes (`model, order, algorithm, lr, beta, seed, schedule`; beta is None for
methods without one), so Tune's table, `ResultGrid.get_dataframe()` and Tune's searchers and schedulers see
them. The leaf is found again in the plan from its axes. `dag.DagSearcher` suggests a leaf only once the nodes
it depends on are published; the trial gets their published checkpoints from the node refs (already resolved).

The trial itself is a light process (no torch, no MLflow) that drives the leaf's work:
- One CPU worker, ZeRO-0: one `leaf_task`, a streaming Ray task that runs in the pool of task workers that
  also trained the nodes, so it finds torch, transformers and MLflow imported and the data and tokenizer
  cached (a trial actor is a fresh process: ~5-10 s of imports on 2 cores, paid per concurrent trial); no
  worker group, no `import deepspeed`.
- Otherwise one TorchTrainer of DeepSpeed workers; its TuneReportCallback forwards `ray.train.report`.
Either way the eval metrics reach Tune at every eval step; the first columns are step and forget score.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from typing import Any

import ray

from reteq import tracking as T
from reteq.sweep.settings import SweepRun
from reteq.sweep.worker import NodeFailed

AXES = ("model", "order", "algorithm", "lr", "beta", "seed", "schedule")
SHOWN = ((T.M_FORGET_SCORE, "forget"), (T.M_TOFU_UTILITY, "tofu_utility"), (T.M_MATH_ACC, "math_acc"))


def axes(leaf) -> dict[str, Any]:
    return {"model": leaf.model, "order": T.order_tag(leaf.order), "algorithm": leaf.algorithm, "lr": leaf.lr,
            "beta": leaf.beta, "seed": leaf.seed, "schedule": leaf.schedule}


def leaf_of(plan, config: dict[str, Any]):
    want = {k: config.get(k) for k in AXES}
    for leaf in plan.leaves:
        if axes(leaf) == want:
            return leaf
    raise KeyError(f"no leaf of the plan has axes {want}")


def tune_metrics(step: int, metrics: dict[str, float], started: float) -> dict[str, float]:
    """Step and forget score first (Tune's table shows the first few), then every eval metric."""
    out: dict[str, float] = {"step": step}
    for key, name in SHOWN:
        if key in metrics:
            out[name] = metrics[key]
    out.update({k.replace("/", "_"): v for k, v in metrics.items()})
    out["trial_started"] = started
    return out


def _unlearn_here(settings: SweepRun, config: dict[str, Any], parents: dict[str, dict], report, started: float,
                  r=None) -> dict[str, float]:
    from reteq.pipeline import Hooks, RunContext, unlearn_leaf
    from reteq.sweep import worker

    r = r or worker.Rank()
    cfg, plan, data = worker.state(settings)
    leaf = leaf_of(plan, config)
    hooks = worker.mlflow_hooks(settings, cfg, leaf.key) if r.rank == 0 else Hooks()
    try:
        ctx = worker.worker_context(cfg, leaf.model, r)
        run = RunContext(cfg, plan, ctx, worker.store(settings), data, hooks)
        parent = run.store.ensure_local(leaf.parent, ctx)
        retrain = run.store.ensure_local(leaf.retrain, ctx) if leaf.retrain else None
        result = unlearn_leaf(run, leaf, parent, retrain, report=lambda s, m: report(tune_metrics(s, m, started)))
    except BaseException as e:
        if r.rank == 0:
            hooks.fail_open_runs("".join(traceback.format_exception_only(type(e), e)).strip())
        raise
    last = result.evals[-1] if result.evals else (0, {})
    return {**tune_metrics(*last, started), "collapsed": float(result.collapsed), "steps": result.steps}


def leaf_worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker of a multi-worker / GPU leaf."""
    import ray.train

    from reteq.sweep import worker

    c = ray.train.get_context()
    r = worker.Rank(c.get_world_rank(), c.get_world_size(), worker.deepspeed_config(config["settings"]),
                    c.get_local_rank())
    _unlearn_here(config["settings"], config["axes"], config["parents"], ray.train.report, config["started"], r)


def leaf_trial(config: dict[str, Any], settings: SweepRun | None = None, parents: dict | None = None) -> None:
    """The Tune trainable: a light process (no torch, no MLflow) that drives the leaf's work and forwards its
    eval metrics to Tune. `parents`: node key -> object ref of its published checkpoint."""
    from ray import tune

    from reteq.sweep import worker
    from reteq.sweep.nodes import leaf_dependencies

    started = time.time()  # reported with every result: tests check it against the parents' publish times
    cfg, plan = worker.plan_of(settings)
    leaf = leaf_of(plan, config)
    try:
        published = {k: ray.get(parents[k]) for k in leaf_dependencies(leaf)}
    except Exception as e:  # the searcher never suggests such a leaf; a resumed trial might meet one
        raise NodeFailed(leaf.parent, f"leaf {leaf.key[:8]}: a node it needs failed: {e}") from None
    if not settings.in_process:
        _unlearn_with_trainer(settings, config, published, cfg, leaf, started)
        return
    # one CPU worker: the leaf runs as a task in Ray's pool of task workers, the same warm processes (torch,
    # transformers, MLflow imported; data, tokenizer cached) that trained the nodes; a Tune trial actor is a
    # fresh process that would pay all of that again. Tune retries the trial (max_failures) if the task dies.
    # "DEFAULT": outside the trial's placement group (one 0.05-CPU bundle), in the cluster's task pool
    task = leaf_task.options(num_cpus=settings.task_cpus, max_retries=0, scheduling_strategy="DEFAULT",
                             runtime_env=settings.runtime_env, name=f"leaf-{T.order_tag(leaf.order)}-{leaf.algorithm}")
    for ref in task.remote(settings, dict(config), published, started):
        tune.report(ray.get(ref))


@ray.remote
def leaf_task(settings: SweepRun, config: dict[str, Any], published: dict[str, dict], started: float):
    """Unlearn one leaf in this task worker, yielding Tune's metrics at every eval step as they come (training
    runs in a thread and never waits on Tune)."""
    results: queue.Queue = queue.Queue()
    error: list[BaseException] = []

    def work() -> None:
        try:
            _unlearn_here(settings, config, published, results.put, started)
        except BaseException as e:  # noqa: BLE001  (re-raised in the task below)
            error.append(e)
        finally:
            results.put(None)

    thread = threading.Thread(target=work, name="unlearn", daemon=True)
    thread.start()
    while (item := results.get()) is not None:
        yield item
    thread.join()
    if error:
        raise error[0]


def _unlearn_with_trainer(settings, config, published, cfg, leaf, started: float) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    ex = cfg.execution
    resources = {"CPU": ex.cpus_per_worker, **ex.worker_resources, **({"GPU": ex.gpus_per_worker} if ex.use_gpu else {})}
    trainer = TorchTrainer(
        leaf_worker_loop,
        train_loop_config={"settings": settings, "axes": dict(config), "parents": published, "started": started},
        scaling_config=ScalingConfig(num_workers=ex.workers, use_gpu=ex.use_gpu, resources_per_worker=resources,
                                     placement_strategy=ex.placement),
        run_config=RunConfig(name=f"leaf-{leaf.key[:12]}", storage_path=settings.storage_path,
                             callbacks=[TuneReportCallback()],
                             failure_config=FailureConfig(max_failures=ex.max_failures),
                             worker_runtime_env={"env_vars": settings.env}),
    )
    trainer.fit()


