"""`reteq run-path`: one path end to end in one process, printing progress and the per-step metric table.

The debugging path: no Ray, no MLflow; checkpoints still go to work_dir/checkpoints and are reused.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from reteq import tracking as T
from reteq.config import SweepConfig
from reteq.data.sources import DataError
from reteq.pipeline import CheckpointStore, DataCache, Hooks, run_leaf
from reteq.sweep.plan import Plan, UnlearnLeaf, build_plan
from reteq.train.recipes import UnlearnResult, WorkerContext


class BadInput(ValueError):
    bad_input = True


def preflight(cfg: SweepConfig, data: DataCache) -> None:
    """Everything that can be wrong with the input, checked before any training starts."""
    from reteq.models import resolve_source

    for m in cfg.models:
        resolve_source(m)  # raises ModelError for a missing local path
    for s in cfg.stages:
        try:
            data.stage(s.name)
        except DataError as e:
            raise DataError(f"stages.{s.name}.source: {e}") from None
    data.math_items()


class PrintHooks(Hooks):
    def __init__(self, out=None):  # None: the sys.stdout of the moment (captured or redirected)
        self.out = out

    def _p(self, msg: str) -> None:
        print(msg, file=self.out or sys.stdout, flush=True)

    def node_skipped(self, node, path):
        self._p(f"[stage] {node.model} {'>'.join(node.prefix)}: reusing {path}")

    def node_started(self, node):
        self._p(f"[stage] {node.model} {'>'.join(node.prefix)}: training stage {node.stage}")

    def node_step(self, node, r):
        self._p(f"  {node.stage} step {r.step:4d} loss {r.loss:8.4f} lr {r.lr:.2e} tok/s {r.tokens_per_s:8.0f}")

    def node_done(self, node, path, stats):
        self._p(f"[stage] {node.stage} done: {stats['steps']} steps, padding {stats['padding_fraction']:.1%} "
                f"-> {path}")

    def leaf_started(self, leaf):
        self._p(f"[unlearn] {leaf.algorithm} lr={leaf.lr:g} beta={leaf.beta} p={leaf.p}")

    def leaf_step(self, leaf, r):
        self._p(f"  unlearn step {r.step:4d} loss {r.loss:10.4f} lr {r.lr:.2e}")


METRIC_COLUMNS = [
    (T.M_FORGET_LABEL, "label_logp"), (T.M_FORGET_PARAPHRASE, "para_logp"), (T.M_FORGET_SCORE, "forget"),
    (T.M_TOFU_LOGP, "tofu_logp"), (T.M_TOFU_UTILITY, "tofu_util"), (T.M_MATH_ACC, "math_acc"),
    (T.M_DEPTH_R, "R_logp"), (T.M_DEPTH_C, "C_logp"), (T.M_DEPTH_U, "U_logp"),
]


def format_table(result: UnlearnResult) -> str:
    cols = [(k, name) for k, name in METRIC_COLUMNS if any(k in m for _, m in result.evals)]
    lines = ["step " + " ".join(f"{name:>11}" for _, name in cols)]
    for step, m in result.evals:
        lines.append(f"{step:4d} " + " ".join(f"{m.get(k, float('nan')):11.4f}" for k, _ in cols))
    if result.collapsed:
        lines.append("collapsed: a non-finite loss stopped unlearning; the last finite metrics are kept")
    return "\n".join(lines)


def choose_leaf(cfg: SweepConfig, model, order, algorithm, lr, beta, seed) -> tuple[UnlearnLeaf, Plan]:
    """The leaf the flags name; unset flags take the first value of the config's grid."""
    from reteq.algorithms import get_algorithm

    plan = build_plan(cfg)
    want_order = tuple(order.split(",")) if order else None
    if want_order and sorted(want_order) != sorted(s.name for s in cfg.stages):
        raise BadInput(f"--order: {','.join(want_order)} is not a permutation of the declared stages")
    if algorithm is not None:
        try:
            get_algorithm(algorithm)
        except ValueError as e:
            raise BadInput(f"--algorithm: {e}") from None
    if lr is not None and not 0 < lr < math.inf:
        raise BadInput(f"--lr: must be a finite number > 0 (got {lr})")
    if beta is not None and not 0 < beta < math.inf:
        raise BadInput(f"--beta: must be a finite number > 0 (got {beta})")
    if model is not None and model not in {m.name for m in cfg.models}:
        raise BadInput(f"--model: {model!r} is not a model of this config")
    base = next(x for x in plan.leaves if model is None or x.model == model)
    m = model or base.model
    s = cfg.seeds[0] if seed is None else seed
    o = want_order or base.order
    alg = algorithm or base.algorithm
    parent = plan.add_path(cfg, m, o, s, base.schedule)  # the order may lie outside the config's grid
    leaf = replace(base, model=m, order=tuple(o), p=o.index(cfg.forget_stage) + 1, algorithm=alg,
                   lr=lr or base.lr, beta=beta if beta is not None else cfg.unlearn.betas_for(alg)[0], seed=s,
                   parent=parent)
    return leaf, plan


def run_path_command(cfg: SweepConfig, *, model=None, order=None, algorithm=None, lr=None, beta=None, seed=None,
                     work_dir=None) -> int:
    leaf, plan = choose_leaf(cfg, model, order, algorithm, lr, beta, seed)
    data = DataCache(cfg)
    preflight(cfg, data)
    work = Path(work_dir or cfg.work_dir)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    ctx = WorkerContext(dtype=cfg.model(leaf.model).dtype, packing=cfg.execution.packing,
                        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    print(f"path {leaf.model} {'>'.join(leaf.order)} (p={leaf.p}) | {leaf.algorithm} lr={leaf.lr:g} "
          f"beta={leaf.beta} seed={leaf.seed}", flush=True)
    result = run_leaf(cfg, plan, leaf, ctx, CheckpointStore(work / "checkpoints"), data, hooks=PrintHooks())
    print(format_table(result))
    print(f"wall time {time.perf_counter() - start:.1f}s")
    return 0
