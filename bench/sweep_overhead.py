"""Orchestration overhead: a small sweep through Ray Tune + Ray Train + MLflow vs the same work in one process.

The same plan (stage nodes trained once, every unlearning leaf run) is executed twice in one invocation:
  1. in-process: `pipeline.run_leaf` for every leaf, sharing one checkpoint store (what `reteq run-path` does);
  2. `reteq sweep`: Ray Tune trials of TorchTrainers (DeepSpeed workers), logged to MLflow.
It prints both wall times and their ratio, with the machine. Usage:
    python bench/sweep_overhead.py [--orders 2] [--algorithms ga,npo] [--workers 1] [--concurrent 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.sweep_configs import tiny_sweep  # noqa: E402  (the same tiny sweep the tests run)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()} | {os.cpu_count()} cores {cpu} | {gpu} | torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--orders", type=int, default=2, help="forget positions 4, 3, ... (one order each)")
    ap.add_argument("--algorithms", default="ga,npo")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--concurrent", type=int, default=2)
    args = ap.parse_args()

    import torch

    from reteq.commands.sweep import sweep_command
    from reteq.config import parse_config
    from reteq.pipeline import CheckpointStore, DataCache, RunContext, run_leaf
    from reteq.plan import build_plan
    from reteq.tiny import ensure_tiny_model
    from reteq.train.recipes import WorkerContext

    ensure_tiny_model()  # built once, outside both timings
    positions = tuple(range(4, 4 - args.orders, -1))
    with tempfile.TemporaryDirectory() as tmp:
        raw = tiny_sweep(Path(tmp) / "sweep", positions=positions, algorithms=tuple(args.algorithms.split(",")),
                         lrs=(1e-3,), workers=args.workers, concurrent=args.concurrent,
                         deepspeed="zero0_fp32.json", unlearn_steps=2)
        cfg = parse_config(raw)
        plan = build_plan(cfg)

        t0 = time.perf_counter()
        torch.set_num_threads(1)
        store, data = CheckpointStore(Path(tmp) / "local" / "checkpoints"), DataCache(cfg)
        for leaf in plan.leaves:
            run_leaf(RunContext(cfg, plan, WorkerContext(), store, data), leaf)
        local = time.perf_counter() - t0

        t0 = time.perf_counter()
        sweep_command(cfg, report=False)
        swept = time.perf_counter() - t0

    print(f"machine: {machine()}")
    print(f"plan: {len(plan.nodes)} stage nodes, {len(plan.leaves)} unlearning runs; "
          f"{args.workers} worker(s) per trial, {args.concurrent} concurrent trial(s)")
    print(f"one process: {local:.1f} s   Ray + MLflow sweep: {swept:.1f} s   ratio: {swept / local:.1f}x")
    print(f"overhead per trial: {(swept - local) / max(1, len(plan.leaves)):.1f} s")


if __name__ == "__main__":
    main()
