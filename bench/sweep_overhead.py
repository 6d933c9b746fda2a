"""Orchestration overhead: a sweep through Ray (node tasks + Tune trials) + MLflow vs the same plan in one process.

The same plan (stage nodes trained once, every unlearning leaf run) is executed twice in one invocation:
  1. in-process: `ensure_chain` + `unlearn_leaf` for every leaf (with its theta_r, so the retrain-equivalence
     metrics are computed both ways), sharing one checkpoint store (what `reteq run-path` does), one torch thread (a Ray worker of `cpus_per_worker < 2` gets one too);
  2. `reteq sweep`: stage nodes as Ray tasks, leaves as Tune trials, everything logged to MLflow.
It prints both wall times, their ratio, the machine and its load, and where the Ray path's time went (node task
and trial durations vs the one-process figures, and the rest: Ray start, Tune, idle gaps). Usage:
    python bench/sweep_overhead.py --config configs/demo.yaml     # the demo plan
    python bench/sweep_overhead.py [--orders 2] [--algorithms ga,npo] [--workers 1] [--concurrent 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from tests.sweep_configs import tiny_sweep  # noqa: E402  (the same tiny sweep the tests run)


class Timed:
    """Hooks that time each node and leaf of the one-process path (for the per-trial breakdown)."""

    def __init__(self):
        from reteq.pipeline.context import Hooks

        self.hooks = Hooks()
        self.node_s: list[float] = []

    def node_started(self, node):
        self._t = time.perf_counter()

    def node_done(self, node, path, stats):
        self.node_s.append(time.perf_counter() - self._t)

    def __getattr__(self, name):
        return getattr(self.hooks, name)


def load(path: str | None, args, tmp: Path):
    from reteq.config import load_config, parse_config

    if path:
        cfg = load_config(path)
        return cfg.model_copy(update={"work_dir": str(tmp / "sweep")})
    positions = tuple(range(4, 4 - args.orders, -1))
    return parse_config(tiny_sweep(tmp / "sweep", positions=positions, algorithms=tuple(args.algorithms.split(",")),
                                   lrs=(1e-3,), workers=args.workers, concurrent=args.concurrent,
                                   deepspeed="zero0_fp32.json", unlearn_steps=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", help="a sweep config (e.g. configs/demo.yaml); default: the tests' tiny sweep")
    ap.add_argument("--orders", type=int, default=2, help="tiny sweep: forget positions 4, 3, ... (one order each)")
    ap.add_argument("--algorithms", default="ga,npo")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--concurrent", type=int, default=2)
    args = ap.parse_args()

    import torch

    from reteq.commands.sweep import run_sweep
    from reteq.pipeline.context import CheckpointStore, DataCache, RunContext
    from reteq.pipeline.leaf import unlearn_leaf
    from reteq.pipeline.node import ensure_chain
    from reteq.plan import build_plan
    from reteq.tiny import ensure_tiny_model
    from reteq.tracking import order_tag
    from reteq.train.worker_context import WorkerContext

    ensure_tiny_model()  # built once, outside both timings
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load(args.config, args, Path(tmp))
        plan = build_plan(cfg)

        t0 = time.perf_counter()
        torch.set_num_threads(1)
        store, data, timed = CheckpointStore(Path(tmp) / "local" / "checkpoints"), DataCache(cfg), Timed()
        leaf_s = []
        for leaf in plan.leaves:
            ctx = WorkerContext(packing=cfg.execution.packing, dtype=cfg.model(leaf.model).dtype)
            run = RunContext(cfg, plan, ctx, store, data, timed)
            parent = ensure_chain(run, leaf.parent)
            retrain = ensure_chain(run, leaf.retrain) if leaf.retrain else None  # theta_r: the RE metrics need it
            t = time.perf_counter()
            unlearn_leaf(run, leaf, parent, retrain)
            leaf_s.append(time.perf_counter() - t)
        local = time.perf_counter() - t0

        t0, wall0 = time.perf_counter(), time.time()
        outcome = run_sweep(cfg, report=False)
        swept = time.perf_counter() - t0
    load_after = os.getloadavg()

    dag = outcome.dag
    nodes = [v for v in dag.node_infos.values() if v.get("started")]
    node_task_s = [v["published"] - v["started"] for v in nodes]
    df = dag.results.get_dataframe()
    trial_s = list(df["timestamp"] - df["trial_started"])  # trial start -> its last report (the leaf's end)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in common.machine().items()))
    print(f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f} on {os.cpu_count()} cores")
    ex = cfg.execution
    print(f"plan: {len(plan.nodes)} stage nodes, {len(plan.leaves)} unlearning runs ({args.config or 'tiny sweep'});"
          f" {ex.workers} worker(s) per node/trial, {ex.max_concurrent_trials} concurrent trial(s)")
    print(f"one process: {local:.1f} s (nodes {sum(timed.node_s):.1f} s, leaves {sum(leaf_s):.1f} s)")
    print(f"Ray + MLflow sweep: {swept:.1f} s (node tasks {sum(node_task_s):.1f} s, trials {sum(trial_s):.1f} s; "
          f"exit code {outcome.code})")
    print(f"per node: one process {sum(timed.node_s) / max(1, len(timed.node_s)):.2f} s, Ray task "
          f"{sum(node_task_s) / max(1, len(node_task_s)):.2f} s; per leaf: one process "
          f"{sum(leaf_s) / max(1, len(leaf_s)):.2f} s, Tune trial {sum(trial_s) / max(1, len(trial_s)):.2f} s")
    print("driver phases (s since start, cumulative): "
          + ", ".join(f"{k} {v:.1f}" for k, v in (outcome.phases or {}).items()))
    print("timeline (s since the sweep call; node tasks then trials):")
    for v in sorted(nodes, key=lambda v: v["started"]):
        print(f"  node {order_tag(plan.nodes[v['key']].prefix):<28} {v['started'] - wall0:6.1f} -> {v['published'] - wall0:6.1f}")
    for _, row in df.sort_values("trial_started").iterrows():
        print(f"  leaf {row['config/order']:<14} {row['config/algorithm']:<7} {row['trial_started'] - wall0:6.1f} -> "
              f"{row['timestamp'] - wall0:6.1f}")
    print(f"ratio: {swept / local:.2f}x")


if __name__ == "__main__":
    main()
