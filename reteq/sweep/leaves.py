"""Unlearning leaves as Ray Tune trials over named axes: the plain half (the trial, its task and its worker group
are in reteq.sweep.remote: `leaf_trial`, `leaf_task`, `leaf_group`).

A trial's config is the leaf's key (`leaf`), then its axes (`model, order, algorithm, lr, seed, schedule`, then
one axis per knob of the sweep's methods, e.g. `beta`, `strength`, `layer`; None where a method has no such
knob), so Tune's table, `ResultGrid.get_dataframe()` and Tune's searchers and schedulers see them, and a trial
finds its leaf in the plan by key. `dag.DagSearcher` suggests a leaf only once the nodes it depends on are
published; the trial gets their published checkpoints from the node refs (already resolved).

The trial itself is a light process (no torch, no MLflow) that drives the leaf's work:
- One CPU worker, ZeRO-0: one `leaf_task`, a streaming Ray task that runs in the pool of task workers that
  also trained the nodes, so it finds torch, transformers and MLflow imported and the data and tokenizer
  cached (a trial actor is a fresh process: ~5-10 s of imports on 2 cores, paid per concurrent trial); no
  worker group, no `import deepspeed`. It yields what `unlearn_streaming` yields.
- Otherwise one TorchTrainer of DeepSpeed workers, each running `unlearn_rank`; its TuneReportCallback
  forwards `ray.train.report`.
Either way the eval metrics reach Tune at every eval step; the first columns are step and forget score.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from reteq import tracking as T
from reteq.sweep import process
from reteq.sweep.rank import Rank, rank_run
from reteq.sweep.settings import SweepRun

# Imports inside functions below are heavy (torch through reteq.pipeline): the Tune trial that imports this
# module only drives a task or a worker group.

LEAF = "leaf"  # the config entry holding the leaf's key: what a trial looks its leaf up by
AXES = ("model", "order", "algorithm", "lr", "seed", "schedule")  # then the knob axes (knob_axes)
SHOWN = ((T.M_FORGET_SCORE, "forget"), (T.M_TOFU_UTILITY, "tofu_utility"), (T.M_MATH_ACC, "math_acc"))


def knob_axes(leaves) -> list[str]:
    """The knob names of the methods these leaves run, each a Tune axis (sorted, so every process agrees)."""
    return sorted({k for leaf in leaves for k in leaf.params})


def axes(leaf, knobs: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The leaf as a Tune config: the fixed axes, then every knob axis of the sweep (None where it has none)."""
    return {"model": leaf.model, "order": T.order_tag(leaf.order), "algorithm": leaf.algorithm, "lr": leaf.lr,
            "seed": leaf.seed, "schedule": leaf.schedule, **{k: leaf.params.get(k) for k in knobs}}


def trial_config(leaf, knobs: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """What a Tune trial of `leaf` is given: the leaf's key, then its axes (for Tune's table)."""
    return {LEAF: leaf.key, **axes(leaf, knobs)}


def axis_values(leaves: list) -> dict[str, list]:
    """Every axis of these leaves with the values it takes (Tune's param_space names the axes for its table)."""
    knobs = knob_axes(leaves)
    out: dict[str, list] = {k: [] for k in (*AXES, *knobs)}
    for leaf in leaves:
        for k, v in axes(leaf, knobs).items():
            if v not in out[k]:
                out[k].append(v)
    return out


def leaf_of(plan, config: dict[str, Any]):
    """The leaf a trial's config names: by its key; a config without one (a table read back), by its axes."""
    if config.get(LEAF):
        return next(leaf for leaf in plan.leaves if leaf.key == config[LEAF])
    want = {k: config.get(k) for k in AXES}
    params = {k: v for k, v in config.items() if k not in (*AXES, LEAF) and v is not None}
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
                 r: Rank | None = None) -> dict[str, float]:
    """Unlearn the leaf `config` names on this rank (a worker group's, or the whole leaf in a task); `report`
    gets Tune's metrics at every eval step."""
    # lazy: keeps torch out of the light processes (driver, Tune trials, the CLI)
    from reteq.pipeline.leaf import unlearn_leaf

    r = r or Rank()
    _, plan = process.plan_of(settings)
    leaf = leaf_of(plan, config)
    with rank_run(settings, leaf.key, leaf.model, r) as run:
        parent = run.store.ensure_local(leaf.parent, run.worker)
        retrain = run.store.ensure_local(leaf.retrain, run.worker) if leaf.retrain else None
        result = unlearn_leaf(run, leaf, parent, retrain, report=lambda s, m: report(tune_metrics(s, m, started)))
    last = result.evals[-1] if result.evals else (0, {})
    return {**tune_metrics(*last, started), "collapsed": float(result.collapsed), "steps": result.steps}


def unlearn_streaming(settings: SweepRun, config: dict[str, Any], published: dict[str, dict], started: float
                      ) -> Iterator[dict[str, float]]:
    """Unlearn one leaf in this process, yielding Tune's metrics at every eval step as they come (training runs
    in a thread and never waits on whoever consumes them); re-raises what the training raised."""
    results: queue.Queue = queue.Queue()
    error: list[BaseException] = []

    def work() -> None:
        try:
            unlearn_rank(settings, config, published, results.put, started)
        except BaseException as e:  # noqa: BLE001  (re-raised below)
            error.append(e)
        finally:
            results.put(None)

    thread = threading.Thread(target=work, name="unlearn", daemon=True)
    thread.start()
    while (item := results.get()) is not None:
        yield item
    thread.join()
    process.release_memory()
    if error:
        raise error[0]
