"""The work of a stage node (finetune one stage) and of an unlearning leaf (unlearn from a published node).

Shared by `reteq run-path` (one process: `run_leaf` trains the order's missing nodes in turn, then unlearns) and
`reteq sweep` (each node its own Ray task, each leaf its own Tune trial: `train_node`, `unlearn_leaf`). What
differs is injected through one RunContext: the WorkerContext (rank, DeepSpeed) and Hooks (where progress and
metrics go: stdout, or MLflow).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reteq import tracking as T
from reteq.config import SweepConfig
from reteq.data.prepare import lookup_prepared, read_prepared
from reteq.data.sources import load_conversations, load_math_eval
from reteq.data.tokenize import IGNORE, configure_chat, encode_conversation
from reteq.errors import DataError
from reteq.eval.evaluator import Evaluator, relative
from reteq.eval.probe import Probe, probe_pairs
from reteq.models import fresh_adapter, load_model, load_tokenizer, partitioned_at_load, resolve_source
from reteq.plan import Plan, RetrainRecord, StageNode, UnlearnLeaf, method_inputs
from reteq.train import collectives
from reteq.train.checkpoint import CheckpointError, discard, gathered_state_dict, is_complete, save_checkpoint
from reteq.train.precision import frozen_base_in
from reteq.train.recipes import UnlearnJob, UnlearnResult, finetune_stage, unlearn
from reteq.train.worker_context import WorkerContext
from reteq.workdir import data_home, resolve_work_dir


class Hooks:
    """Progress sinks; the default does nothing. Called on the main worker only."""

    def node_skipped(self, node: StageNode, path: Path) -> None: ...
    def node_started(self, node: StageNode) -> None: ...
    def node_resumed(self, node: StageNode, step: int) -> None: ...  # after node_started: steps already done
    def node_step(self, node: StageNode, record) -> None: ...
    def node_done(self, node: StageNode, path: Path, stats: dict[str, Any]) -> None: ...
    def run_params(self, key: str, params: dict[str, str]) -> None: ...  # after node/leaf_started
    def leaf_started(self, leaf: UnlearnLeaf) -> None: ...
    def leaf_step(self, leaf: UnlearnLeaf, record) -> None: ...
    def leaf_eval(self, leaf: UnlearnLeaf, step: int, metrics: dict[str, float]) -> None: ...
    def leaf_done(self, leaf: UnlearnLeaf, result: UnlearnResult) -> None: ...
    def retrain_started(self, rec: RetrainRecord, node_run_id: str, checkpoint: Path) -> None: ...
    def retrain_done(self, rec: RetrainRecord, metrics: dict[str, float]) -> None: ...

    def run_id(self, key: str) -> str:
        """The id of the run these hooks recorded `key` in ("" when they record nowhere)."""
        return ""

    def fail_open_runs(self, error: str) -> None:
        """The work failed with `error`: end every run these hooks left open, saying why."""


@dataclass
class CheckpointStore:
    """This machine's published checkpoints, by node key. `fetch` (reteq.sweep.delivery) copies a node published
    elsewhere (another machine, via MLflow) into it; None in one process, where everything is local."""

    root: Path
    fetch: Callable[[str, Path], Path | None] | None = None

    def path(self, key: str) -> Path:
        return Path(self.root) / key

    def has(self, key: str) -> bool:
        """True for a complete, verified checkpoint; a corrupt or partial copy is removed (never loaded, never
        kept), so whatever repairs it (an MLflow artifact, or retraining) publishes into an empty place."""
        if is_complete(self.path(key), key):
            return True
        discard(self.path(key))
        return False

    def ensure_local(self, key: str, ctx: WorkerContext) -> Path:
        """Call on EVERY rank before loading `key`. Only each machine's local rank 0 reads the store: it verifies
        the checkpoint (sha256) and fetches a missing or corrupt one; the other ranks wait for its word (one
        all-gather, so a machine that cannot get it fails every rank with its reason instead of hanging one)."""
        error = None
        if ctx.local_rank == 0 and not self.has(key):
            try:
                if self.fetch is None or self.fetch(key, self.path(key)) is None:
                    error = "not published anywhere this worker can fetch from"
            except Exception as e:  # reach the collective anyway, or the other ranks hang
                error = f"{type(e).__name__}: {e}"
        errors = collectives.all_gather_object(error, ctx.device) if ctx.world > 1 else [error]
        if error:
            raise CheckpointError(f"node {key}: no verified checkpoint in {self.root} on this machine (rank "
                                  f"{ctx.rank}): {error}")
        failed = [(rank, e) for rank, e in enumerate(errors) if e]
        if failed:
            raise CheckpointError(f"node {key}: the machine of rank {failed[0][0]} has no verified checkpoint: "
                                  f"{failed[0][1]}")
        return self.path(key)


@dataclass
class DataCache:
    """Stage conversations and eval items, loaded once per process."""

    cfg: SweepConfig
    _stages: dict[str, list[dict]] = field(default_factory=dict)
    _math: list | None = None

    @classmethod
    def holding(cls, cfg: SweepConfig, stages: dict[str, list[dict]]) -> DataCache:
        """A cache that already holds these stages' conversations (e.g. the files `reteq data prepare` wrote)."""
        return cls(cfg, dict(stages))

    def stage(self, name: str) -> list[dict]:
        """A stage's conversations; a hub source reads its `reteq data prepare` copy when one exists."""
        if name not in self._stages:
            source = self.cfg.stage(name).source
            prepared = None
            if source.kind == "hub":
                for data_dir in filter(None, (data_home(), resolve_work_dir(self.cfg.work_dir) / "data")):
                    prepared = prepared or lookup_prepared(source, data_dir)
            if prepared is not None:
                self._stages[name] = read_prepared(prepared)
            else:
                self._stages[name] = load_conversations(source)
        return self._stages[name]

    def math_items(self) -> list[tuple[str, str]]:
        if self._math is None:
            e = self.cfg.eval
            self._math = load_math_eval(e.math_source, e.math_questions) if "math" in e.metrics else []
        return self._math


def preflight(cfg: SweepConfig, data: DataCache, report: Callable[[str], None] | None = None) -> None:
    """Everything that can be wrong with the input, checked before any training starts (raises BadInput);
    `report` gets one line per stage, model and length limit: how many rows it truncates."""
    for m in cfg.models:
        resolve_source(m)  # raises ModelError for a missing local path
    for s in cfg.stages:
        try:
            data.stage(s.name)
        except DataError as e:
            raise DataError(f"stages.{s.name}.source: {e}") from None
    try:
        data.math_items()
    except DataError as e:
        raise DataError(f"eval.math_source: {e}") from None
    check_rows_fit(cfg, data, report)


def check_rows_fit(cfg: SweepConfig, data: DataCache, report: Callable[[str], None] | None = None) -> None:
    """Every training row keeps at least one assistant token after truncation to its max_length: a row whose
    prompt fills it would train on nothing (an all-ignored batch is a NaN loss hours into a sweep). And
    truncation is visible: each stage's count of rows longer than its limit is reported, and a share above
    `stages[*].max_truncated_frac` stops here (a cut answer trains on a different target than the authors')."""
    for m in cfg.models:
        tokenizer = configure_chat(load_tokenizer(m), cfg.chat)
        for s in cfg.stages:
            limits = [(s.max_length, f"stages.{s.name}.max_length")]
            if s.name == cfg.forget_stage:
                limits.append((cfg.unlearn.max_length, "unlearn.max_length"))
            origin = s.source.path or s.source.id or f"synthetic:{s.source.task}"
            rows = [encode_conversation(tokenizer, conv, _UNLIMITED, i) for i, conv in enumerate(data.stage(s.name))]
            for limit, where in limits:
                for e in rows:
                    if all(label == IGNORE for label in e.labels[:limit]):
                        raise DataError(f"stages.{s.name}.source: {origin}: row {e.index}: messages: no assistant "
                                        f"token fits in {limit} tokens ({where}, model {m.name})")
                over, line = truncation(rows, limit)
                if report is not None:
                    report(f"{where} = {limit}, model {m.name}: {line}")
                if over > s.max_truncated_frac * len(rows):
                    raise DataError(f"{where}: {line}, above stages.{s.name}.max_truncated_frac "
                                    f"({s.max_truncated_frac:g}) (model {m.name}); raise the limit or the share")


_UNLIMITED = 1 << 30  # encode whole rows; each limit is applied by slicing


def truncation(rows, limit: int) -> tuple[int, str]:
    """(rows longer than `limit` tokens, one line saying so with the longest row's length)."""
    lengths = [len(e.input_ids) for e in rows]
    over = sum(n > limit for n in lengths)
    share = over / len(lengths) if lengths else 0.0
    return over, f"{over} of {len(lengths)} rows ({share:.1%}) exceed {limit} tokens (longest {max(lengths, default=0)})"


def _broadcast(obj, ctx: WorkerContext):
    return obj if ctx.world == 1 else collectives.broadcast_object(obj, ctx.device)


@dataclass
class RunContext:
    """Everything the work of a node or leaf needs, built once per process (by `reteq run-path`, or in each Ray
    task, Tune trial or Train worker of `reteq sweep`) instead of being threaded through every call."""

    cfg: SweepConfig
    plan: Plan
    worker: WorkerContext  # rank, world, device, DeepSpeed config, precision, packing
    store: CheckpointStore
    data: DataCache
    hooks: Hooks = field(default_factory=Hooks)


def ensure_chain(run: RunContext, key: str) -> Path:
    """One process or one worker group: the checkpoint of node `key`, training its missing ancestors first, in
    order, from the deepest published one (the main rank decides; a rank on another machine fetches it).

    The sweep does not come here: there every node is its own Ray task (reteq.sweep.nodes)."""
    ctx, chain = run.worker, run.plan.chain(key)
    found = None
    if ctx.is_main:
        found = next((i for i in range(len(chain) - 1, -1, -1) if run.store.has(chain[i].key)), -1)
    found = _broadcast(found, ctx)
    parent = None
    if found >= 0:
        if ctx.is_main:
            run.hooks.node_skipped(chain[found], run.store.path(chain[found].key))
        parent = run.store.ensure_local(chain[found].key, ctx)
    for node in chain[found + 1:]:
        parent = train_node(run, node, parent)
    assert parent is not None
    return parent


def train_node(run: RunContext, node: StageNode, parent: Path | None, resume=None) -> Path:
    """Train one stage node from its parent's checkpoint (None: the base model) and publish its checkpoint.
    `resume` (reteq.sweep.stage_resume, Ray Train only): continue from a mid-stage checkpoint, save new ones."""
    cfg, ctx, hooks = run.cfg, run.worker, run.hooks
    mcfg = cfg.model(node.model)
    tokenizer = configure_chat(load_tokenizer(mcfg), cfg.chat)
    torch.manual_seed(node.seed)
    with partitioned_at_load(ctx.ds_config):  # ZeRO-3: each rank builds and loads only its shards
        model = load_model(mcfg, checkpoint=parent, seed=node.seed)
    model = model.to(ctx.device)
    if ctx.is_main:
        hooks.node_started(node)
        hooks.run_params(node.key, T.protocol_params(cfg))
        if resume is not None and resume.step:
            hooks.node_resumed(node, resume.step)
    stage_seed = (int(node.key[:8], 16) + node.seed) % (2**31)  # deterministic across processes
    module, result, stats = finetune_stage(
        model, tokenizer, cfg.stage(node.stage, node.schedule), run.data.stage(node.stage), ctx, stage_seed,
        on_step=(lambda r: hooks.node_step(node, r)) if ctx.is_main else None, resume=resume)
    if result.collapsed:
        raise RuntimeError(f"stage {node.stage} of {node.model}: non-finite loss")
    path = run.store.path(node.key)
    state = gathered_state_dict(module, ctx.is_main)  # every rank takes part under ZeRO-3; None otherwise
    if ctx.is_main:
        meta = {"model": node.model, "prefix": list(node.prefix), "seed": node.seed, "parent": node.parent}
        save_checkpoint(module, path, node.key, meta, state_dict=state)
        stats = {**stats, "final_loss": result.records[-1].loss if result.records else float("nan"),
                 "tokens_per_s": _mean_tps(result.records)}
        hooks.node_done(node, path, stats)
    if ctx.world > 1:  # main has published and recorded the node before any rank (or machine) looks for it
        collectives.barrier(ctx.device)
    return run.store.ensure_local(node.key, ctx)  # ranks on other machines fetch what main published


def _mean_tps(records) -> float:
    tokens = sum(r.tokens for r in records)
    secs = sum(r.seconds for r in records)
    return tokens / secs if secs else float("nan")


def unlearn_leaf(run: RunContext, leaf: UnlearnLeaf, parent: Path, retrain: Path | None = None,
                 report: Callable[[int, dict[str, float]], None] | None = None) -> UnlearnResult:
    """Unlearn the forget set from the parent node's checkpoint (`retrain`: theta_r's, the probe's reference).
    `report(step, metrics)` runs on every rank at every evaluation (Ray Train's report is a collective); hooks
    run on the main worker only."""
    cfg, ctx, data, hooks = run.cfg, run.worker, run.data, run.hooks
    mcfg = cfg.model(leaf.model)
    tokenizer = configure_chat(load_tokenizer(mcfg), cfg.chat)
    evaluator = build_evaluator(cfg, tokenizer, data, leaf.seed)
    evaluator.probe = build_probe(cfg, tokenizer, data)
    if retrain is not None:  # theta_r's distributions, once per leaf, before the unlearned model is loaded
        reference = load_model(mcfg, checkpoint=retrain, trainable=False).to(ctx.device)
        with frozen_base_in(reference, ctx.scoring_dtype, ctx.holds_bf16_base):  # as the unlearned model's
            evaluator.probe.set_reference(reference, ctx.device, ctx.scoring_dtype)
        del reference
    model = load_model(mcfg, checkpoint=parent)
    if cfg.unlearn.adapter == "fresh":  # the authors: a new LoRA on the merged finetuned weights
        model = fresh_adapter(model, mcfg, leaf.seed)
    model = model.to(ctx.device)
    if ctx.is_main:
        hooks.leaf_started(leaf)
        hooks.run_params(leaf.key, {**T.protocol_params(cfg, leaf.algorithm),
                                    **T.sample_params(evaluator.sample_hashes()),
                                    T.P_PROBE_HASH: evaluator.probe.digest,
                                    T.P_PROBE_SIZE: str(len(evaluator.probe.triples)),
                                    T.P_VOCAB_SIZE: str(len(tokenizer))})

    def on_eval(step: int, metrics: dict[str, float]) -> None:
        if ctx.is_main:
            hooks.leaf_eval(leaf, step, metrics)
        if report is not None:
            report(step, metrics)

    retain = data.stage(cfg.retain_stage) if method_inputs(cfg, leaf.algorithm, leaf.params).get("retain") else None
    job = UnlearnJob(cfg.unlearn_for(leaf.schedule), leaf.algorithm, leaf.lr, leaf.params,
                     data.stage(cfg.forget_stage), leaf.seed, retain=retain, start=leaf.parent)
    result = unlearn(model, tokenizer, job, evaluator, ctx, on_eval=on_eval,
                     on_step=(lambda r: hooks.leaf_step(leaf, r)) if ctx.is_main else None)
    result.vectors = evaluator.probe.table({step for step, _ in result.evals})  # a collapsed step's are dropped
    if ctx.is_main:
        hooks.leaf_done(leaf, result)
    return result


def build_evaluator(cfg: SweepConfig, tokenizer, data: DataCache, seed: int) -> Evaluator:
    """The paper's metrics on the sweep's eval sample (the same for every leaf and retrain record)."""
    know = data.stage(cfg.eval.knowledge_stage) if cfg.eval.knowledge_stage else None
    return Evaluator.build(cfg.eval, tokenizer, data.stage(cfg.forget_stage), know, data.math_items(), seed=seed)


def record_retrain(run: RunContext, rec: RetrainRecord, checkpoint: Path, node_run_id: str = "") -> dict[str, float]:
    """theta_r's record: evaluate the retrain node's published checkpoint once, as an unlearning run evaluates
    its model at step 0 (same sample, seed and metrics; no probe: its distance to itself is 0), and log it as
    the run of kind "retrain". Nothing is trained, no checkpoint is uploaded again (the run names the node's)."""
    cfg, ctx, hooks = run.cfg, run.worker, run.hooks
    mcfg = cfg.model(rec.model)
    tokenizer = configure_chat(load_tokenizer(mcfg), cfg.chat)
    evaluator = build_evaluator(cfg, tokenizer, run.data, rec.seed)
    model = load_model(mcfg, checkpoint=checkpoint, trainable=False).to(ctx.device)
    if ctx.is_main:
        hooks.retrain_started(rec, node_run_id, checkpoint)
        hooks.run_params(rec.key, {**T.protocol_params(cfg), **T.sample_params(evaluator.sample_hashes()),
                                   T.P_VOCAB_SIZE: str(len(tokenizer))})
    ctx.apply_numerics()
    with frozen_base_in(model, ctx.scoring_dtype, ctx.holds_bf16_base):  # as an unlearning run's step 0
        raw = evaluator.raw(model, ctx.device, ctx.scoring_dtype)
    metrics = relative(raw, raw)
    if ctx.is_main:
        hooks.retrain_done(rec, metrics)
    return metrics


def run_leaf(run: RunContext, leaf: UnlearnLeaf) -> UnlearnResult:
    """One process (`reteq run-path`, the overhead benchmark): the order's missing nodes, then the leaf."""
    parent = ensure_chain(run, leaf.parent)
    retrain = ensure_chain(run, leaf.retrain) if leaf.retrain else None
    return unlearn_leaf(run, leaf, parent, retrain)


def build_probe(cfg: SweepConfig, tokenizer, data: DataCache) -> Probe:
    """The sweep's fixed probe set (same pairs for every run: eval.probe_size, eval.probe_seed)."""
    stages = {s.name: data.stage(s.name) for s in cfg.stages}
    triples = probe_pairs(cfg.eval.probe_size, cfg.eval.probe_seed, stages, cfg.forget_stage, data.math_items(),
                          cfg.eval.unlearn_label)
    return Probe.build(tokenizer, triples, cfg.eval.batch_size)
