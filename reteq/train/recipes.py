"""The two jobs, each setup -> train (the shared loop) -> result: finetune one stage, unlearn the forget set.

Both run unchanged in one process (`reteq run-path`) and inside Ray Train workers (`reteq sweep`); the
WorkerContext (reteq.train.worker_context) says which worker this is and whether DeepSpeed drives the step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from reteq.algorithms import get_algorithm
from reteq.algorithms.method import RETAIN_TOKEN_MEAN, RETAIN_WEIGHT, Need
from reteq.config import StageConfig, UnlearnConfig
from reteq.data.alternatives import idk_conversations
from reteq.data.packing import layout_for, packed_micro_batches, padding_fraction
from reteq.data.tokenize import Example, encode_dataset, micro_batches, plan_steps
from reteq.eval.evaluator import Evaluator, relative
from reteq.train.engine import OptimSpec, build_engine
from reteq.train.logprobs import batch_token_logps
from reteq.train.loop import LoopResult, Step, StepRecord, train_loop
from reteq.train.method_inputs import Pairing, gather, mean_tokens, retain_nll
from reteq.train.precision import FrozenBase, apply_matmul_policy, frozen_base_in
from reteq.train.reference import Batching, compute_reference
from reteq.train.worker_context import WorkerContext


@contextmanager
def evaluating(base: FrozenBase, ctx: WorkerContext) -> Iterator[str]:
    """Evaluation under `ctx`'s evaluation precision (its TF32 setting; the frozen base in bf16 under bf16), the
    training precision's back on exit. Yields the dtype to score under."""
    dtype = ctx.scoring_dtype
    apply_matmul_policy(dtype)
    base.use(dtype)
    try:
        yield dtype
    finally:
        base.use(ctx.dtype)
        apply_matmul_policy(ctx.dtype)


def accumulation_steps(global_batch: int, micro_batch: int, world: int, where: str) -> int:
    if global_batch % (micro_batch * world):
        raise ValueError(f"{where}: global_batch {global_batch} is not a multiple of micro_batch {micro_batch} "
                         f"x workers {world}")
    return global_batch // (micro_batch * world)


def build_steps(examples: list[Example], index_steps: list[list[int]], micro: int, ctx: WorkerContext,
                pad_id: int, model=None) -> list[Step]:
    steps = []
    for idx in index_steps:
        label_tokens = sum(examples[i].n_label_tokens for i in idx)
        if ctx.packing:  # [packing hook] same number of micro-batches per worker, samples packed into rows
            mbs = packed_micro_batches(examples, idx, micro, ctx.rank, ctx.world, pad_id, layout_for(model))
        else:
            mbs = micro_batches(examples, idx, micro, ctx.rank, ctx.world, pad_id)
        steps.append(Step(mbs, label_tokens, len(idx), tuple(idx)))
    return steps


# the two optional hooks (logging; mid-stage resume, which needs the engine built here) follow the six inputs
# params: a stage's six inputs and its two optional hooks
def finetune_stage(model, tokenizer, stage: StageConfig, convs: list[dict], ctx: WorkerContext, seed: int,
                   on_step: Callable[[StepRecord], None] | None = None,
                   resume=None) -> tuple[torch.nn.Module, LoopResult, dict]:
    """Train one stage with a fresh optimizer and schedule; token-mean cross-entropy on response tokens.
    `resume` (reteq.sweep.stage_resume.StageResume, every rank): load its state and skip its steps, and save
    mid-stage checkpoints."""
    ctx.apply_numerics()  # [precision hook] TF32 on only under dtype tf32; denormals as configured
    examples = encode_dataset(tokenizer, convs, stage.max_length)
    accum = accumulation_steps(stage.global_batch, stage.micro_batch, ctx.world, f"stages.{stage.name}")
    index_steps = plan_steps(len(examples), stage.epochs, stage.global_batch, seed)
    steps = build_steps(examples, index_steps, stage.micro_batch, ctx, tokenizer.pad_token_id, model)
    spec = OptimSpec(stage.optimizer, stage.lr, len(steps), stage.schedule, stage.warmup_frac, stage.decay_frac,
                     stage.min_lr_ratio)
    engine = build_engine(model, spec, ds_config=ctx.ds_config, micro_batch=stage.micro_batch,
                          accumulation=accum, world=ctx.world)

    def loss_fn(m, batch, step: Step) -> torch.Tensor:
        logp, _ = batch_token_logps(m, batch)  # [packing hook] padded or packed batch
        return -logp.sum() / step.label_tokens

    def after_step(record: StepRecord) -> None:
        if on_step:
            on_step(record)
        if resume is not None:
            resume.after_step(engine, record.step, len(steps))

    if resume is not None:
        resume.load(engine)
    with frozen_base_in(engine.module, ctx.dtype, ctx.holds_bf16_base):  # [precision hook] a LoRA base in bf16 under bf16
        result = train_loop(engine, steps, loss_fn, device=ctx.device, dtype=ctx.dtype, on_step=after_step,
                            first_step=resume.step if resume is not None else 0, seed=seed)
    pad = padding_fraction([b for s in steps for b in s.micro_batches])
    stats = {"steps": len(steps), "padding_fraction": pad, "examples": len(examples)}
    return engine.module, result, stats


@dataclass(frozen=True)
class UnlearnJob:
    """One unlearning run: the forget set, the method with its lr and knobs (e.g. {"beta": 0.5}), the seed; the
    retain set's conversations (only read by a method with a retain term whose retain_weight > 0) and the start
    checkpoint's key (leaves from one checkpoint share its reference pass in a warm worker)."""

    cfg: UnlearnConfig
    algorithm: str
    lr: float
    params: Mapping[str, float]
    forget: list[dict]  # the forget set's conversations
    seed: int = 0
    retain: list[dict] | None = None
    start: str | None = None
    # step 0's raw metrics: share_start(compute) returns them, computed by compute() or read from the start
    # checkpoint's shared record (reteq.pipeline.leaf.step0_sharing); None: compute() here
    share_start: Callable[[Callable[[], dict[str, float]]], dict[str, float]] | None = None


def normaliser(step: Step, normalisation: str) -> int:
    """What a step's summed method loss is divided by: its global batch's sequences (`sequence`: the mean
    per-sequence loss) or response tokens (`token`: for GA the token-mean log-prob of the authors' NegCE loss,
    src/loss.py; for the token-level methods open-unlearning's mean over valid tokens)."""
    return step.label_tokens if normalisation == "token" else step.sequences


@dataclass
class UnlearnResult:
    evals: list[tuple[int, dict[str, float]]]  # (step, metrics incl. relative scores), step 0 first
    loop: LoopResult
    steps: int
    vectors: Any = None  # polars frame of the probe's per-pair vectors (step x pair), set by pipeline.leaf.unlearn_leaf
    # wall seconds by part: train (optimizer steps), reference (pi_ref pass), and each eval group (Evaluator)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def collapsed(self) -> bool:
        return self.loop.collapsed


def unlearn(model, tokenizer, job: UnlearnJob, evaluator: Evaluator, ctx: WorkerContext,
            on_eval: Callable[[int, dict[str, float]], None] | None = None,
            on_step: Callable[[StepRecord], None] | None = None) -> UnlearnResult:
    """Unlearn the forget set with a local method; evaluate at step 0 and every `eval_every` steps (each metric
    group when eval.schedule says, every group at step 0 and the last step)."""
    cfg, alg = job.cfg, get_algorithm(job.algorithm)
    params = {**alg.defaults, **job.params}  # a knob the job leaves out takes the method's default
    ctx.apply_numerics()  # [precision hook]
    pad_id = tokenizer.pad_token_id
    examples = encode_dataset(tokenizer, job.forget, cfg.max_length)
    accum = accumulation_steps(cfg.global_batch, cfg.micro_batch, ctx.world, "unlearn")
    index_steps = plan_steps(len(examples), cfg.epochs, cfg.global_batch, job.seed, cfg.steps)
    steps = build_steps(examples, index_steps, cfg.micro_batch, ctx, pad_id, model)
    alternatives = (encode_dataset(tokenizer, idk_conversations(job.forget), cfg.max_length)
                    if Need.ALTERNATIVE in alg.needs else None)
    retain_weight = float(params[RETAIN_WEIGHT]) if alg.reads_retain_at(params) else 0.0
    if retain_weight and not job.retain:
        raise ValueError(f"{job.algorithm}: retain_weight {retain_weight:g} but the job has no retain set")
    pairing = Pairing(encode_dataset(tokenizer, job.retain, cfg.max_length), job.seed) if retain_weight else None
    with frozen_base_in(model, ctx.dtype, ctx.holds_bf16_base) as base:  # [precision hook] a LoRA base in bf16 under bf16
        # shared across leaves only by a single worker: ranks with different histories would disagree on a cache
        # hit, and under ZeRO-3 the rank that runs the reference pass would wait in a collective for the one that
        # skips it
        start = time.perf_counter()
        ref = compute_reference(model, alg, examples, alternatives,
                                Batching(cfg.micro_batch, pad_id, ctx.device, ctx.packing, ctx.dtype),
                                job.start if ctx.world == 1 else None)
        seconds = {"reference": time.perf_counter() - start}

        def evaluate(m, step: int) -> dict[str, float]:
            with evaluating(base, ctx) as dtype:
                return evaluator.raw(m, ctx.device, dtype, step=step, last=len(steps))

        raw0 = job.share_start(lambda: evaluate(model, 0)) if job.share_start else evaluate(model, 0)
        evals = [(0, relative(raw0, raw0))]
        if on_eval:
            on_eval(0, evals[0][1])

        spec = OptimSpec(cfg.optimizer, job.lr, len(steps), cfg.schedule, cfg.warmup_frac, cfg.decay_frac,
                         cfg.min_lr_ratio, cfg.warmup_steps)
        normalisation = cfg.normalisation(job.algorithm)
        engine = build_engine(model, spec, ds_config=ctx.ds_config, micro_batch=cfg.micro_batch,
                              accumulation=accum, world=ctx.world)

        def loss_fn(m, batch, step: Step) -> torch.Tensor:
            x = gather(m, batch, alg, params, ref, alternatives, pad_id)
            if alternatives is not None:
                x.alt_mean_tokens = mean_tokens(alternatives, step.index)
            loss = alg.loss(x, params) / normaliser(step, normalisation)
            if pairing is not None:  # the retain term over the step's sequences (RETAIN_TOKEN_MEAN: which mean)
                per = mean_tokens(pairing, step.index) if params.get(RETAIN_TOKEN_MEAN) else None
                loss = loss + retain_weight * retain_nll(m, pairing, batch.index.cpu(), pad_id,
                                                         batch.input_ids.device, per) / step.sequences
            return loss

        def after_step(record: StepRecord) -> bool:
            if on_step:
                on_step(record)
            if record.step % cfg.eval_every == 0 or record.step == len(steps):
                metrics = relative(evaluate(engine.module, record.step), raw0)
                evals.append((record.step, metrics))
                if on_eval:
                    on_eval(record.step, metrics)
                return not all(math.isfinite(v) for v in metrics.values())
            return False

        loop = train_loop(engine, steps, loss_fn, device=ctx.device, dtype=ctx.dtype, on_step=after_step,
                          seed=job.seed)
    if loop.stopped_early:  # evaluation went non-finite: treat as collapse, keep the last finite metrics
        loop.collapsed = True
        evals.pop()
    seconds["train"] = sum(r.seconds for r in loop.records)
    return UnlearnResult(evals, loop, len(steps), seconds={**seconds, **evaluator.seconds})
