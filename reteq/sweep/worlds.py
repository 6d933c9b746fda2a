"""Results across worker counts: the same stage nodes and leaves trained by 1 worker and by N, traced, compared.

Why this exists: reteq divides every loss by its *global* batch's response tokens or sequences (reteq.train.loop,
recipes.normaliser), so one worker accumulating A micro-batches and N workers each taking A/N of them compute one
big batch's gradient; data order, packing, LoRA init and dropout are seeded by the node key or the leaf's seed,
never by a rank (reteq.data.tokenize.plan_steps, reteq.data.packing, reteq.train.loop.micro_batch_seed). What
is left is the order of fp32 additions (a gradient all-reduce, a loss summed over ranks instead of over
micro-batches, DeepSpeed's flattened buffers), so a result agrees across worker counts within a tolerance
(TOLERANCE, docs/cluster.md "Results across worker counts"), never bitwise.

A trace is what a user comparing two clusters compares: every stage node's per-step loss and every leaf's
per-step loss and eval metrics. `trace` is one rank's work (one order's missing nodes, then its leaves, through
the pipeline's own `ensure_chain` / `unlearn_leaf`); who starts the ranks is the caller's:
- reteq.sweep.remote.trace_with_ray_train: Ray Train workers, as the sweep runs a multi-worker node or leaf
  (tests/test_world_size.py, bench/world_size.py --launcher ray);
- bench/world_size.py --launcher torch: plain processes in a gloo (CPU) or NCCL (GPU) group, no Ray (the GPU
  image has none; bench/gpu_suite.sh).
This module imports no Ray for that reason (its Ray Train half is in reteq.sweep.remote); reteq.config needs pydantic,
which the GPU image has only when DeepSpeed's wheels are carried (../shared/STACK.md).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from reteq import tracking as T
from reteq.config import SweepConfig
from reteq.pipeline.context import CheckpointStore, DataCache, Hooks, RunContext
from reteq.pipeline.leaf import unlearn_leaf
from reteq.pipeline.node import ensure_chain
from reteq.plan import build_plan
from reteq.train.deepspeed_config import deepspeed_needed

# The documented agreement between worker counts (docs/cluster.md): |a - b| <= TOLERANCE for every per-step
# loss and eval metric of the tiny model in fp32 (log-probs and losses of order 1-10). Measured differences
# are about 1e-6 (tests/test_world_size.py prints them); the margin covers longer runs, where Adam carries a
# reduction-order difference of one step into the next.
TOLERANCE = 1e-4


class TraceHooks(Hooks):
    """Records, on the main rank, each node's per-step loss and each leaf's per-step loss and eval metrics."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}
        self.leaves: dict[str, dict[str, Any]] = {}

    def node_started(self, node) -> None:
        self.nodes[node.key] = {"label": f"{node.model} {T.order_tag(node.prefix)}", "losses": [],
                                "started": time.time()}

    def node_done(self, node, path, stats) -> None:
        self.nodes[node.key]["seconds"] = time.time() - self.nodes[node.key].pop("started")

    def node_step(self, node, record) -> None:
        self.nodes[node.key]["losses"].append(record.loss)

    def leaf_started(self, leaf) -> None:
        self.leaves[leaf.key] = {"label": f"{leaf.algorithm} {T.order_tag(leaf.order)}", "algorithm": leaf.algorithm,
                                 "losses": [], "evals": {}, "started": time.time()}

    def leaf_done(self, leaf, result) -> None:
        self.leaves[leaf.key]["seconds"] = time.time() - self.leaves[leaf.key].pop("started")

    def leaf_step(self, leaf, record) -> None:
        self.leaves[leaf.key]["losses"].append(record.loss)

    def leaf_eval(self, leaf, step: int, metrics: dict[str, float]) -> None:
        self.leaves[leaf.key]["evals"][str(step)] = dict(metrics)


def engine_config(ds: dict[str, Any] | None, world: int, use_gpu: bool) -> dict[str, Any] | None:
    """The DeepSpeed config a rank trains with, as the sweep decides it: one CPU worker with nothing for
    DeepSpeed to do (ZeRO-0, fp32) trains with plain torch (reteq.sweep.process.in_process)."""
    return ds if world > 1 or use_gpu or deepspeed_needed(ds) else None


def trace(cfg: SweepConfig, ctx, store_root: str | Path, algorithms: list[str] | None = None) -> dict[str, Any]:
    """Train every leaf of `cfg`'s plan (or those of `algorithms`), their missing nodes first, on this rank of
    `ctx`'s group; returns the trace (filled on the main rank only). Nodes already in `store_root` are loaded,
    not trained: a store holding another world's nodes makes a leaf read their checkpoints."""
    started = time.time()
    plan = build_plan(cfg)
    hooks = TraceHooks()
    run = RunContext(cfg, plan, ctx, CheckpointStore(Path(store_root)), DataCache(cfg), hooks)
    for leaf in plan.leaves:
        if algorithms is not None and leaf.algorithm not in algorithms:
            continue
        parent = ensure_chain(run, leaf.parent)
        retrain = ensure_chain(run, leaf.retrain) if leaf.retrain else None
        unlearn_leaf(run, leaf, parent, retrain)
    return {"world": ctx.world, "zero": _zero(ctx.ds_config), "engine": "deepspeed" if ctx.ds_config else "torch",
            "seconds": time.time() - started, "nodes": hooks.nodes, "leaves": hooks.leaves}


def _zero(ds: dict[str, Any] | None) -> int:
    return int((ds or {}).get("zero_optimization", {}).get("stage", 0))


def differences(a: dict[str, Any], b: dict[str, Any], partial: bool = False) -> dict[str, float]:
    """Largest |a - b| per quantity over every node, leaf and step: `loss/<node label>`, `loss/<algorithm>`, and
    each eval metric by its MLflow name (over every leaf and eval step). `partial`: `b` may hold fewer nodes and
    leaves than `a` (e.g. its leaves read `a`'s checkpoints instead of training nodes). A node, leaf, step or
    metric one trace has and the other lacks raises ValueError: a missing step is a disagreement, not a zero
    difference."""
    for kind in ("nodes", "leaves"):
        if not partial and a[kind].keys() != b[kind].keys():
            raise ValueError(f"the traces hold different {kind}: {len(a[kind])} against {len(b[kind])}")
    out: dict[str, float] = {}

    def put(name: str, x: float, y: float) -> None:
        d = abs(x - y) if math.isfinite(x) and math.isfinite(y) else (0.0 if x == y else math.inf)
        out[name] = max(out.get(name, 0.0), d)

    for kind in ("nodes", "leaves"):
        for key, mine in b[kind].items():
            theirs = a[kind].get(key)
            if theirs is None:
                raise ValueError(f"{kind[:-1]} {mine['label']} ({key[:8]}) is in one trace only")
            if len(theirs["losses"]) != len(mine["losses"]):
                raise ValueError(f"{mine['label']}: {len(theirs['losses'])} steps against {len(mine['losses'])}")
            name = f"loss/{mine['label'] if kind == 'nodes' else mine['algorithm']}"
            for x, y in zip(theirs["losses"], mine["losses"], strict=True):
                put(name, x, y)
            if kind == "leaves":
                if theirs["evals"].keys() != mine["evals"].keys():
                    raise ValueError(f"{mine['label']}: eval steps {sorted(theirs['evals'])} against "
                                     f"{sorted(mine['evals'])}")
                for step, metrics in mine["evals"].items():
                    if theirs["evals"][step].keys() != metrics.keys():
                        raise ValueError(f"{mine['label']}: step {step} has other metrics")
                    for metric, y in metrics.items():
                        put(metric, theirs["evals"][step][metric], y)
    return dict(sorted(out.items()))


def largest(diffs: dict[str, float]) -> tuple[str, float]:
    """The quantity that differs most, and by how much."""
    return max(diffs.items(), key=lambda kv: kv[1]) if diffs else ("none", 0.0)
