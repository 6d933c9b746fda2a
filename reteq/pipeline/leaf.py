"""An unlearning leaf's work: unlearn the forget set from its parent node's checkpoint (`unlearn_leaf`); theta_r's
record (`record_retrain`); the evaluator and probe every leaf and record shares; run-path's whole path
(`run_leaf`: the order's missing nodes, then the leaf)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from reteq import tracking as T
from reteq.config import SweepConfig
from reteq.data.tokenize import configure_chat
from reteq.digest import spec_hash
from reteq.eval.evaluator import Evaluator, relative
from reteq.eval.probe import Probe, probe_pairs
from reteq.eval.start_record import FORMAT, encode
from reteq.models import fresh_adapter, load_model, load_tokenizer
from reteq.pipeline.context import DataCache, RunContext
from reteq.pipeline.node import ensure_chain
from reteq.plan import RetrainRecord, UnlearnLeaf, method_inputs
from reteq.train.precision import frozen_base_in
from reteq.train.recipes import UnlearnJob, UnlearnResult, unlearn
from reteq.train.worker_context import WorkerContext


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
                     data.stage(cfg.forget_stage), leaf.seed, retain=retain, start=leaf.parent,
                     share_start=step0_sharing(run, leaf, evaluator, len(tokenizer)))
    result = unlearn(model, tokenizer, job, evaluator, ctx, on_eval=on_eval,
                     on_step=(lambda r: hooks.leaf_step(leaf, r)) if ctx.is_main else None)
    result.vectors = evaluator.probe.table({step for step, _ in result.evals})  # a collapsed step's are dropped
    if ctx.is_main:
        hooks.leaf_done(leaf, result)
    return result


def step0_sharing(run: RunContext, leaf: UnlearnLeaf, evaluator: Evaluator, vocab: int
                  ) -> Callable[[Callable[[], dict[str, float]]], dict[str, float]]:
    """Step 0 once per start checkpoint (execution.share_start_eval; reteq.eval.start_record says why the numbers
    are the leaf's own): the returned function reads the start record from the hooks' store, or computes step 0
    and publishes it. Either way the probe keeps its step-0 rows and the hooks hear where the metrics came from."""
    cfg, ctx, hooks = run.cfg, run.worker, run.hooks
    share = cfg.execution.share_start_eval and ctx.world == 1  # ranks of a multi-worker leaf all evaluate
    key = start_key(cfg, leaf, evaluator, ctx, vocab) if share else ""

    def step0(compute: Callable[[], dict[str, float]]) -> dict[str, float]:
        if share:
            start = time.perf_counter()
            found = hooks.start_record(key)
            if found is not None:
                record, source = found
                if evaluator.probe is not None:
                    evaluator.probe.rows.extend(record["probe_rows"])
                evaluator.seconds["start_record"] = time.perf_counter() - start
                hooks.start_source(leaf.key, source)
                return record["raw"]
        raw = compute()
        if share:
            rows = [r for r in evaluator.probe.rows if r["step"] == 0] if evaluator.probe is not None else []
            hooks.publish_start_record(leaf.key, key, *encode(key, raw, rows))
        if ctx.is_main:
            hooks.start_source(leaf.key, "computed")
        return raw

    return step0


def start_key(cfg: SweepConfig, leaf: UnlearnLeaf, evaluator: Evaluator, ctx: WorkerContext, vocab: int) -> str:
    """The content address of a leaf's step-0 evaluation (reteq.eval.start_record says what enters it and why)."""
    probe = evaluator.probe
    device = ctx.device
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else torch.backends.cpu.get_cpu_capability())
    spec = {"format": FORMAT, "parent": leaf.parent, "retrain": leaf.retrain, "seed": leaf.seed,
            "model": cfg.model(leaf.model).model_dump(mode="json"), "adapter": cfg.unlearn.adapter,
            "chat": cfg.chat.model_dump(mode="json"), "eval": cfg.eval.model_dump(mode="json"),
            "samples": evaluator.sample_hashes(), "probe": probe.digest if probe is not None else None,
            "probe_size": len(probe.triples) if probe is not None else 0, "vocab": vocab,
            "precision": {"dtype": ctx.dtype, "scoring": ctx.scoring_dtype, "bf16_base": ctx.holds_bf16_base,
                          "flush_denormal": ctx.flush_denormal},
            "device": device.type, "hardware": hardware, "torch": torch.__version__}
    return spec_hash(spec, length=32)


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
