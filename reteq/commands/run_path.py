"""`reteq run-path`: one leaf (a finetuning order, then one unlearning run) end to end in one process,
printing progress and the per-step metric table.

For debugging: no Ray, no MLflow; checkpoints still go to work_dir/checkpoints and are reused.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, replace

import torch

from reteq import tracking as T
from reteq.algorithms import ALGORITHMS
from reteq.config import SweepConfig, load_config
from reteq.errors import BadInput
from reteq.pipeline.context import CheckpointStore, DataCache, Hooks, RunContext
from reteq.pipeline.leaf import run_leaf
from reteq.pipeline.preflight import preflight
from reteq.plan import Plan, UnlearnLeaf, build_plan
from reteq.train.recipes import UnlearnResult
from reteq.train.worker_context import WorkerContext
from reteq.workdir import resolve_work_dir


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
        self._p(f"[unlearn] {leaf.algorithm} lr={leaf.lr:g} {T.params_tag(leaf.params)} p={leaf.p}")

    def leaf_step(self, leaf, r):
        self._p(f"  unlearn step {r.step:4d} loss {r.loss:10.4f} lr {r.lr:.2e}")


METRIC_COLUMNS = [
    (T.M_FORGET_LABEL, "label_logp"), (T.M_FORGET_PARAPHRASE, "para_logp"), (T.M_FORGET_SCORE, "forget"),
    (T.M_TOFU_LOGP, "tofu_logp"), (T.M_TOFU_UTILITY, "tofu_util"), (T.M_MATH_ACC, "math_acc"),
    (T.M_DEPTH_R, "R_logp"), (T.M_DEPTH_C, "C_logp"), (T.M_DEPTH_U, "U_logp"),
    (T.M_RE_LOGP_MSE, "re_logp_mse"), (T.M_RE_KL, "re_kl"),
]


def format_table(result: UnlearnResult) -> str:
    cols = [(k, name) for k, name in METRIC_COLUMNS if any(k in m for _, m in result.evals)]
    lines = ["step " + " ".join(f"{name:>11}" for _, name in cols)]
    for step, m in result.evals:
        lines.append(f"{step:4d} " + " ".join(f"{m.get(k, float('nan')):11.4f}" for k, _ in cols))
    if result.collapsed:
        lines.append("collapsed: a non-finite loss stopped unlearning; the last finite metrics are kept")
    return "\n".join(lines)


@dataclass(frozen=True)
class PathFlags:
    """The leaf `reteq run-path` was asked for; None takes the first value of the config's grid."""

    model: str | None = None
    order: str | None = None  # comma-separated finetuning order, e.g. "inst,tofu,math,U"
    algorithm: str | None = None
    lr: float | None = None
    beta: float | None = None  # the same as params ("<algorithm>.beta=<value>",), kept for older scripts
    seed: int | None = None
    params: tuple[str, ...] = ()  # "<method>.<knob>=<value>" each, e.g. "npo.beta=0.5" (--param)


def knob_setting(text: str, algorithm: str) -> tuple[str, float]:
    """`--param <method>.<knob>=<value>` as (knob, value), checked against the method's declared knobs and bounds
    (reteq.algorithms); the method must be the leaf's."""
    name, sep, raw = text.partition("=")
    method, dot, knob = name.strip().partition(".")
    if not (sep and dot and method and knob):
        raise BadInput(f"--param {text}: write <method>.<knob>=<value>, e.g. npo.beta=0.5")
    if method != algorithm:
        raise BadInput(f"--param {text}: the leaf runs {algorithm}, not {method} (choose it with --algorithm)")
    try:
        value = float(raw)
    except ValueError:
        raise BadInput(f"--param {text}: {raw.strip()!r} is not a number") from None
    problem = ALGORITHMS[algorithm].check(knob, [value])
    if problem:
        raise BadInput(f"--param {text}: {problem}")
    default = ALGORITHMS[algorithm].knobs[knob].default
    return knob, type(default)(value)


def choose_leaf(cfg: SweepConfig, flags: PathFlags) -> tuple[UnlearnLeaf, Plan]:
    """The leaf the flags name; unset flags take the first value of the config's grid."""
    plan = build_plan(cfg)
    want_order = tuple(flags.order.split(",")) if flags.order else None
    if want_order and sorted(want_order) != sorted(s.name for s in cfg.stages):
        raise BadInput(f"--order: {','.join(want_order)} is not a permutation of the declared stages")
    if flags.algorithm is not None and flags.algorithm not in ALGORITHMS:
        raise BadInput(f"--algorithm: unknown algorithm {flags.algorithm!r} (known: {', '.join(sorted(ALGORITHMS))})")
    if flags.lr is not None and not 0 < flags.lr < math.inf:
        raise BadInput(f"--lr: must be a finite number > 0 (got {flags.lr})")
    if flags.beta is not None and not 0 < flags.beta < math.inf:
        raise BadInput(f"--beta: must be a finite number > 0 (got {flags.beta})")
    if flags.model is not None and flags.model not in {m.name for m in cfg.models}:
        raise BadInput(f"--model: {flags.model!r} is not a model of this config")
    base = next(x for x in plan.leaves if flags.model is None or x.model == flags.model)
    m = flags.model or base.model
    s = cfg.seeds[0] if flags.seed is None else flags.seed
    o = want_order or base.order
    alg = flags.algorithm or base.algorithm
    parent = plan.add_order(cfg, m, o, s, base.schedule)  # the order may lie outside the config's grid
    retrain = plan.add_retrain(cfg, m, tuple(o), s, base.schedule) if cfg.eval.retrain else None
    params = cfg.unlearn.knob_grid(alg)[0]  # each knob's first grid value (or its default)
    method = ALGORITHMS[alg]
    if flags.beta is not None and "beta" not in method.knobs:
        raise BadInput(f"--beta: {alg} has no beta knob (its knobs: {', '.join(method.knobs) or 'none'})")
    settings = ((f"{alg}.beta={flags.beta!r}",) if flags.beta is not None else ()) + flags.params  # --beta: alias
    params = method.keyed({**params, **dict(knob_setting(text, alg) for text in settings)})
    leaf = replace(base, model=m, order=tuple(o), p=o.index(cfg.forget_stage) + 1, algorithm=alg,
                   lr=flags.lr or base.lr, params=params, seed=s, parent=parent, retrain=retrain)
    return leaf, plan


def run_path_command(config: str, flags: PathFlags, work_dir: str | None = None,
                     overrides: tuple[str, ...] = ()) -> int:
    cfg = load_config(config, overrides=overrides)
    leaf, plan = choose_leaf(cfg, flags)
    data = DataCache(cfg)
    preflight(cfg, data, report=lambda line: print(f"preflight: {line}", flush=True))
    work = resolve_work_dir(work_dir or cfg.work_dir)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    ctx = WorkerContext.for_model(cfg, leaf.model, device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    print(f"path {leaf.model} {'>'.join(leaf.order)} (p={leaf.p}) | {leaf.algorithm} lr={leaf.lr:g} "
          f"{T.params_tag(leaf.params)} seed={leaf.seed}", flush=True)
    run = RunContext(cfg, plan, ctx, CheckpointStore(work / "checkpoints"), data, hooks=PrintHooks())
    result = run_leaf(run, leaf)
    print(format_table(result))
    print(f"wall time {time.perf_counter() - start:.1f}s")
    return 0
