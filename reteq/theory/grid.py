"""The Section 3 experiment: a grid of random linear instances checked against Theorem 3.1, as a Ray Tune run
logged to MLflow.

Why Tune for numpy work that takes milliseconds: the theory grid is a sweep like the LLM ones, so it should
land in the same system of record (one MLflow experiment, a parent run, a child run per instance, the keys of
reteq.tracking) and be launched, resumed and inspected the same way. To keep Tune's per-trial overhead from
dominating, one trial is one grid cell (d, n_a, n_b, k, mu, eta) that runs all its seeds and writes each
instance with one batched MLflow call.

Per instance the child run records the divergence d(theta_AB(t), theta_BA(t)), the Theorem 3.1 bound and the
retrain gap at every step t, plus summaries. The retrain gap reads the theorem's two models as the retrain
baselines of a three-stage world in which S_U was also learned: for each of the 6 orders of {A, B, U},
retraining without S_U gives theta_AB or theta_BA (the retain stages in that order), so
retrain_gap(t) = max over the 6 orders of d(GA^t(theta_order), theta_retrain(order)) is the worst case a
path-oblivious method that stops at step t must accept; its minimum over t is logged, and so is, for each
position p of S_U, how close the best order with S_U at p ever gets.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param

from reteq import environment
from reteq import tracking as tk
from reteq.analysis.gaps import growth_rate
from reteq.errors import BadInput
from reteq.mlflow_store import ensure_experiment, reader, tracking_client
from reteq.sweep.ray_session import init_ray
from reteq.theory.beyond import Unlearning, retrain_gaps, rule_divergence
from reteq.theory.config import TheoryConfig, load_theory_config  # noqa: F401  (re-exported)
from reteq.theory.linear import Instance, bound_check, make_instance

INSTANCE_PARAMS = ("d", "n_a", "n_b", "k", "m", "mu", "eta", "seed", "rho_star", "sigma_U", "C0", "t0")



# ---- one instance ------------------------------------------------------------------------------------------
def evaluate_instance(inst: Instance, steps: int) -> dict[str, Any]:
    """Per-step curves and summaries of one instance (pure numpy; what a child run records)."""
    q = inst.theorem()
    divergence, bound = inst.divergence(steps), inst.bound(steps)
    if not (np.all(np.isfinite(divergence)) and np.all(np.isfinite(bound))):
        raise FloatingPointError(
            f"divergence overflowed float64 within {steps} steps (eta={inst.eta}, "
            f"k={inst.k}); lower steps or eta"
        )
    holds, checked = bound_check(divergence, bound, q.t0)
    t = np.arange(steps + 1)
    start = max(q.t0, 0)
    growth = growth_rate(t[start:], divergence[start:])
    stages = [(inst.X_A, inst.y_A), (inst.X_B, inst.y_B), (inst.X_U, inst.y_U)]
    gaps = retrain_gaps(stages, 2, inst.X_test, inst.mu, Unlearning(inst.eta, steps))
    retrain_gap = gaps.gaps.max(axis=0)
    positions = np.array([order.index(2) + 1 for order in gaps.orders])
    summary = {
        tk.M_THEORY_BOUND_HOLDS: float(holds),
        tk.M_THEORY_BOUND_CHECKED: float(checked),
        tk.M_THEORY_LOG1P_RHO: math.log1p(q.rho_star),
        tk.M_THEORY_RETRAIN_GAP_MIN: float(retrain_gap.min()),
    }
    for p in (1, 2, 3):
        summary[f"{tk.M_THEORY_RETRAIN_CLOSEST_P}{p}"] = float(gaps.closest[positions == p].min())
    if checked:
        summary[tk.M_THEORY_MIN_LOG_MARGIN] = float(np.min(np.log(divergence[start:]) - np.log(bound[start:])))
    if math.isfinite(growth.rate):
        summary[tk.M_THEORY_GROWTH_RATE], summary[tk.M_THEORY_GROWTH_R2] = growth.rate, growth.r2
    for key, rule in ((tk.M_THEORY_NPO_DIVERGENCE, "npo"), (tk.M_THEORY_SIMNPO_DIVERGENCE, "simnpo")):
        summary[key] = float(
            rule_divergence(
                inst.theta_ab, inst.theta_ba, inst.X_U, inst.y_U, inst.X_test, Unlearning(inst.eta, steps, rule)
            )[-1]
        )
    params = {
        "d": inst.d,
        "n_a": inst.X_A.shape[0],
        "n_b": inst.X_B.shape[0],
        "k": inst.k,
        "m": inst.m,
        "mu": inst.mu,
        "eta": inst.eta,
        "seed": inst.seed,
        "rho_star": q.rho_star,
        "sigma_U": q.sigma_U,
        "C0": q.C0,
        "t0": q.t0,
    }
    curves = {
        tk.M_THEORY_DIVERGENCE: divergence,
        tk.M_THEORY_BOUND: bound,
        tk.M_THEORY_RETRAIN_GAP: retrain_gap,
    }
    return {"params": params, "curves": curves, "summary": summary, "holds": holds, "checked": checked}


def _param_str(v: Any) -> str:
    return f"{v:.10g}" if isinstance(v, float) else str(v)


def log_instance(
    client, experiment_id: str, parent_run_id: str, sweep: str, result: dict[str, Any], steps: int
) -> str:
    """One child run, written with create_run + chunked log_batch + set_terminated."""
    p = result["params"]
    tags = {
        tk.TAG_KIND: tk.KIND_THEORY,
        tk.TAG_SWEEP: sweep,
        tk.TAG_SEED: str(p["seed"]),
        tk.TAG_ALGORITHM: "ga",
        tk.TAG_LR: tk.format_float(p["eta"]),
        tk.TAG_STATUS: tk.STATUS_DONE,
        tk.TAG_MLFLOW_PARENT: parent_run_id,
    }
    name = tk.run_name(
        tk.KIND_THEORY,
        f"d{p['d']}-k{p['k']}-mu{_param_str(p['mu'])}-eta{_param_str(p['eta'])}",
        f"s{p['seed']}",
    )
    run = client.create_run(experiment_id, tags=tags, run_name=name)
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(v), now, t) for key, curve in result["curves"].items() for t, v in enumerate(curve)
    ]
    metrics += [Metric(key, float(v), now, 0) for key, v in result["summary"].items()]
    params = [Param(k, _param_str(p[k])) for k in INSTANCE_PARAMS] + [Param(tk.P_STEPS, str(steps))]
    for i in range(0, max(len(metrics), 1), 1000 - len(params)):
        client.log_batch(
            run.info.run_id, metrics=metrics[i : i + 1000 - len(params)], params=params if i == 0 else ()
        )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def run_cell(cell: dict[str, Any], ctx: dict[str, Any]) -> dict[str, int]:
    """All seeds of one grid cell: evaluate, log each instance, return the counts (also used without Tune)."""
    client = reader(ctx["tracking_uri"])
    counts = {"instances": 0, "bound_holds": 0, "nonvacuous": 0}
    for seed in range(ctx["first_seed"], ctx["first_seed"] + ctx["seeds"]):
        inst = make_instance(
            cell["d"], cell["n_a"], cell["n_b"], cell["k"], ctx["m"], cell["mu"], cell["eta"], seed
        )
        result = evaluate_instance(inst, ctx["steps"])
        log_instance(client, ctx["experiment_id"], ctx["parent_run_id"], ctx["sweep"], result, ctx["steps"])
        counts["instances"] += 1
        counts["bound_holds"] += int(result["holds"])
        counts["nonvacuous"] += int(result["checked"] > 0)
    return counts


def _ray():
    """Ray with Tune, imported on first use: the one place this module imports it."""
    import ray.tune  # lazy: keeps Ray out of `import reteq.theory` and the CLI's startup

    return ray


def _cell_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Tune function trainable: one cell, one report."""
    tune = _ray().tune

    environment.telemetry_off()
    tune.report(run_cell(config["cell"], ctx))


# ---- the grid ----------------------------------------------------------------------------------------------
def _start_parent(client, experiment_id: str, cfg: TheoryConfig) -> str:
    """The parent run (kind sweep); the grid definition goes in as params, not an artifact, so nothing lands
    in the working directory when there is no artifact root."""
    parent = client.create_run(
        experiment_id,
        run_name=tk.run_name(tk.KIND_SWEEP, "theory", cfg.name),
        tags={tk.TAG_KIND: tk.KIND_SWEEP, tk.TAG_SWEEP: cfg.name},
    )
    params = [Param(key, json.dumps(value)) for key, value in cfg.model_dump(mode="json").items()]
    client.log_batch(parent.info.run_id, params=params)
    return parent.info.run_id


def _fit(cfg: TheoryConfig, ctx: dict[str, Any], storage_path: str | None) -> dict[str, int]:
    """One Tune trial per cell; the summed counts, or an error naming what failed or did not finish."""
    tune = _ray().tune

    trainable = tune.with_resources(tune.with_parameters(_cell_trial, ctx=ctx), {"cpu": cfg.cpus_per_trial})
    storage = storage_path or str(Path(tempfile.gettempdir()) / "reteq-theory-tune")
    tuner = tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search(cfg.cells())},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=cfg.max_concurrent_trials,
            reuse_actors=True,
            time_budget_s=cfg.time_budget_s,
        ),
        run_config=tune.RunConfig(
            storage_path=str(Path(storage).resolve()), name=f"theory-{cfg.name}", verbose=0
        ),
    )
    results = tuner.fit()
    errors = [str(r.error).strip().splitlines()[-1] for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} theory trial(s) failed; first: {errors[0]}")
    unfinished = sum(1 for r in results if "instances" not in (r.metrics or {}))
    if unfinished or len(results) != len(cfg.cells()):
        raise RuntimeError(
            f"{unfinished or len(cfg.cells()) - len(results)} theory trial(s) did not finish "
            f"within time_budget_s={cfg.time_budget_s}"
        )
    return {
        key: sum(int(r.metrics[key]) for r in results) for key in ("instances", "bound_holds", "nonvacuous")
    }


def run_theory_grid(
    cfg: TheoryConfig,
    tracking_uri: str,
    artifact_root: str | None,
    experiment: str,
    storage_path: str | None = None,
) -> dict[str, Any]:
    """Run the grid as one Ray Tune experiment (one trial per cell) logging to MLflow; return the counts."""
    environment.telemetry_off()
    ray = _ray()

    started = time.time()
    we_started_ray = init_ray()
    client, parent_id = tracking_client(tracking_uri), None
    try:
        total_cpus = ray.cluster_resources().get("CPU", 0)
        if cfg.cpus_per_trial > total_cpus:  # checked before MLflow is touched: bad input leaves no runs
            raise BadInput(
                f"cpus_per_trial={cfg.cpus_per_trial} exceeds the cluster's {total_cpus} CPUs "
                "(trials would stay PENDING forever)"
            )
        experiment_id = ensure_experiment(tracking_uri, experiment, artifact_root)
        parent_id = _start_parent(client, experiment_id, cfg)
        ctx = {
            "tracking_uri": tracking_uri,
            "experiment_id": experiment_id,
            "parent_run_id": parent_id,
            "sweep": cfg.name,
            "m": cfg.m,
            "steps": cfg.steps,
            "seeds": cfg.seeds,
            "first_seed": cfg.first_seed,
        }
        counts = _fit(cfg, ctx, storage_path)
    except BaseException:
        if parent_id is not None:
            client.set_tag(parent_id, tk.TAG_STATUS, tk.STATUS_FAILED)
            client.set_terminated(parent_id, status="FAILED")
        raise
    finally:
        if we_started_ray:
            ray.shutdown()

    now = int(time.time() * 1000)
    client.log_batch(
        parent_id,
        metrics=[
            Metric(tk.M_THEORY_GRID_INSTANCES, counts["instances"], now, 0),
            Metric(tk.M_THEORY_GRID_BOUND_HOLDS, counts["bound_holds"], now, 0),
            Metric(tk.M_THEORY_GRID_NONVACUOUS, counts["nonvacuous"], now, 0),
        ],
    )
    client.set_tag(parent_id, tk.TAG_STATUS, tk.STATUS_DONE)
    client.set_terminated(parent_id)
    return {
        **counts,
        "cells": len(cfg.cells()),
        "experiment": experiment,
        "experiment_id": experiment_id,
        "parent_run_id": parent_id,
        "tracking_uri": tracking_uri,
        "wall_s": round(time.time() - started, 2),
    }
