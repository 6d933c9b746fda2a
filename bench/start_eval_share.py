"""What evaluating step 0 once per start checkpoint saves (execution.share_start_eval, reteq.eval.start_record).

Runs the first two leaves of a config in one process with the sweep's MLflow hooks (what each Ray trial does):
both with sharing on (the first evaluates step 0 and publishes it, the second reads it), then the second again with
sharing off (it evaluates step 0 itself), and prints each leaf's wall time, its time/* split, and whether the
second leaf's logged metrics are the same with and without sharing (bit for bit).

    python bench/start_eval_share.py configs/smol_science.yaml /tmp/share_bench \\
        --set seeds=[0] --set orders.forget_positions=[4] --set unlearn.algorithms=[ga,npo] \\
        --set unlearn.lrs=[1.0e-4]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from reteq import mlflow_store
from reteq import tracking as T
from reteq.config import load_config
from reteq.pipeline.context import CheckpointStore, DataCache, RunContext
from reteq.pipeline.leaf import run_leaf
from reteq.plan import build_plan
from reteq.sweep import record
from reteq.train.worker_context import WorkerContext


def _leaf(cfg, plan, leaf, work: Path, store: CheckpointStore, data: DataCache) -> tuple[float, str, str]:
    """Run one leaf with the sweep's hooks on the store under `work`: (wall seconds, its run id, the store uri)."""
    uri = f"sqlite:///{work.resolve() / 'mlflow.db'}"
    work.mkdir(parents=True, exist_ok=True)
    exp = mlflow_store.ensure_experiment(uri, cfg.name, T.default_artifact_root(work))
    c = mlflow_store.tracking_client(uri)
    parent = record.parent_run(c, exp, cfg.name, cfg.digest())
    hooks = record.MlflowHooks(uri, exp, parent, cfg.name, lambda s: "wsd", echo=lambda m: None)
    start = time.perf_counter()
    run_leaf(RunContext(cfg, plan, WorkerContext.for_model(cfg, leaf.model), store, data, hooks=hooks), leaf)
    return time.perf_counter() - start, hooks.run_id(leaf.key), uri


def _metrics(uri: str, run_id: str) -> tuple[dict, dict, dict]:
    c = mlflow_store.reader(uri)
    run = c.get_run(run_id)
    history = {k: sorted((m.step, m.value) for m in c.get_metric_history(run_id, k))
               for k in run.data.metrics if not k.startswith(("time/", "system/"))}
    times = {k: v for k, v in run.data.metrics.items() if k.startswith("time/")}
    return run.data.tags, history, times


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(s == t and (x == y or (math.isnan(x) and math.isnan(y)))
                                       for (s, x), (t, y) in zip(a[k], b[k])) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("work", type=Path, help="a fresh folder (checkpoints and two MLflow stores go there)")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a sweep worker has 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, overrides=(*args.overrides, f"work_dir={args.work}"))
    off = cfg.model_copy(update={"execution": cfg.execution.model_copy(update={"share_start_eval": False})})
    plan = build_plan(cfg)
    first, second = plan.leaves[:2]
    assert first.parent == second.parent, "the first two leaves must start from one checkpoint"
    store, data = CheckpointStore(args.work / "checkpoints"), DataCache(cfg)
    if not store.has(first.parent):  # train the path once, outside the timings
        start = time.perf_counter()
        run_leaf(RunContext(off, plan, WorkerContext.for_model(cfg, first.model), store, data), first)
        print(f"nodes + a warm-up leaf: {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for name, c, leaf, where in (("first, shared on (computes, publishes)", cfg, first, "on"),
                                 ("second, shared on (reads)", cfg, second, "on"),
                                 ("second, shared off (computes)", off, second, "off")):
        wall, rid, uri = _leaf(c, plan, leaf, args.work / where, store, data)
        tags, history, times = _metrics(uri, rid)
        rows.append((name, wall, tags.get(T.TAG_START_SOURCE, ""), history, times))
        split = " ".join(f"{k.removeprefix('time/')}={v:.1f}" for k, v in sorted(times.items()))
        print(f"{name}: {leaf.algorithm} {wall:.1f} s, step 0 {tags.get(T.TAG_START_SOURCE)}; {split}", flush=True)
    saved = rows[2][1] - rows[1][1]
    print(f"second leaf: {rows[2][1]:.1f} s computing step 0, {rows[1][1]:.1f} s reading it: {saved:.1f} s saved "
          f"({saved / rows[2][1]:.0%})")
    print(f"second leaf's metrics with and without sharing bit-identical: {_same(rows[1][3], rows[2][3])}")


if __name__ == "__main__":
    main()
