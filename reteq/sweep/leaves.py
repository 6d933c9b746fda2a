"""Unlearning leaves as Ray Tune trials over named axes.

A trial's config is the leaf's axes (`model, order, algorithm, lr, seed, schedule`, then one axis per knob of
the sweep's methods, e.g. `beta`, `strength`, `layer`; None where a method has no such knob), so Tune's table, `ResultGrid.get_dataframe()` and Tune's searchers and schedulers see
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
from typing import Any

import ray
from ray import tune

from reteq import tracking as T
from reteq.sweep import worker
from reteq.sweep.nodes import leaf_dependencies
from reteq.sweep.settings import SweepRun
from reteq.sweep.worker import NodeFailed

# Imports inside functions below are heavy (torch through reteq.pipeline, Ray Train): the Tune trial that
# imports this module only drives a task or a worker group.

AXES = ("model", "order", "algorithm", "lr", "seed", "schedule")  # then the knob axes (knob_axes)
SHOWN = ((T.M_FORGET_SCORE, "forget"), (T.M_TOFU_UTILITY, "tofu_utility"), (T.M_MATH_ACC, "math_acc"))


def knob_axes(leaves) -> list[str]:
    """The knob names of the methods these leaves run, each a Tune axis (sorted, so every process agrees)."""
    return sorted({k for leaf in leaves for k in leaf.params})


def axes(leaf, knobs: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The leaf as a Tune config: the fixed axes, then every knob axis of the sweep (None where it has none)."""
    return {"model": leaf.model, "order": T.order_tag(leaf.order), "algorithm": leaf.algorithm, "lr": leaf.lr,
            "seed": leaf.seed, "schedule": leaf.schedule, **{k: leaf.params.get(k) for k in knobs}}


def leaf_of(plan, config: dict[str, Any]):
    want = {k: config.get(k) for k in AXES}
    params = {k: v for k, v in config.items() if k not in AXES and v is not None}
    for leaf in plan.leaves:
        if axes(leaf) == want and leaf.params == params:
            return leaf
    raise KeyError(f"no leaf of the plan has axes {want} and knobs {params}")


def tune_metrics(step: int, metrics: dict[str, float], started: float) -> dict[str, float]:
    """Step and forget score first (Tune's table shows the first few), then every eval metric."""
    out: dict[str, float] = {"step": step}
    for key, name in SHOWN:
        if key in metrics:
            out[name] = metrics[key]
    out.update({k.replace("/", "_"): v for k, v in metrics.items()})
    out["trial_started"] = started
    return out


def unlearn_rank(settings: SweepRun, config: dict[str, Any], parents: dict[str, dict], report, started: float,
                  r=None) -> dict[str, float]:
    # lazy: keeps torch out of the light processes (driver, Tune trials, the CLI)
    from reteq.pipeline import unlearn_leaf

    r = r or worker.Rank()
    _, plan = worker.plan_of(settings)
    leaf = leaf_of(plan, config)
    with worker.rank_run(settings, leaf.key, leaf.model, r) as run:
        parent = run.store.ensure_local(leaf.parent, run.worker)
        retrain = run.store.ensure_local(leaf.retrain, run.worker) if leaf.retrain else None
        result = unlearn_leaf(run, leaf, parent, retrain, report=lambda s, m: report(tune_metrics(s, m, started)))
    last = result.evals[-1] if result.evals else (0, {})
    return {**tune_metrics(*last, started), "collapsed": float(result.collapsed), "steps": result.steps}


def leaf_worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker of a multi-worker / GPU leaf."""
    # lazy: Ray Train/Tune internals only where used; planning and light processes skip them
    import ray.train

    c = ray.train.get_context()
    r = worker.Rank(c.get_world_rank(), c.get_world_size(), worker.deepspeed_config(config["settings"]),
                    c.get_local_rank())
    unlearn_rank(config["settings"], config["axes"], config["parents"], ray.train.report, config["started"], r)


def leaf_trial(config: dict[str, Any], settings: SweepRun | None = None, parents: dict | None = None) -> None:
    """The Tune trainable: a light process (no torch, no MLflow) that drives the leaf's work and forwards its
    eval metrics to Tune. `parents`: node key -> object ref of its published checkpoint."""
    started = time.time()  # reported with every result: tests check it against the parents' publish times
    cfg, plan = worker.plan_of(settings)
    leaf = leaf_of(plan, config)
    try:
        published = {k: ray.get(parents[k]) for k in leaf_dependencies(leaf)}
    except Exception as e:  # the searcher never suggests such a leaf; a resumed trial might meet one
        raise NodeFailed(leaf.parent, f"leaf {leaf.key[:8]}: a node it needs failed: {e}") from None
    if not settings.in_process:
        _unlearn_in_group(settings, config, published, cfg, leaf, started)
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
    """Unlearn one leaf in this task worker, yielding Tune's metrics at every eval step as they come (training
    runs in a thread and never waits on Tune)."""
    results: queue.Queue = queue.Queue()
    error: list[BaseException] = []

    def work() -> None:
        try:
            unlearn_rank(settings, config, published, results.put, started)
        except BaseException as e:  # noqa: BLE001  (re-raised in the task below)
            error.append(e)
        finally:
            results.put(None)

    thread = threading.Thread(target=work, name="unlearn", daemon=True)
    thread.start()
    while (item := results.get()) is not None:
        yield item
    thread.join()
    worker.release_memory()
    if error:
        raise error[0]


def _unlearn_in_group(settings: SweepRun, config, published, cfg, leaf, started: float) -> None:
    """A worker group of `execution.workers` ranks unlearns the leaf (each runs `unlearn_rank`); rank 0's
    `ray.train.report` reaches Tune through Train's TuneReportCallback."""
    # lazy: Ray Train/Tune internals only where used; planning and light processes skip them
    from ray.tune.integration.ray_train import TuneReportCallback

    worker.worker_group(settings, cfg, leaf_worker_loop,
                        {"settings": settings, "axes": dict(config), "parents": published, "started": started},
                        f"leaf-{leaf.key[:12]}", callbacks=[TuneReportCallback()]).fit()
