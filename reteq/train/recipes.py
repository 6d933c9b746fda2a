"""The two jobs, each setup -> train (the shared loop) -> result: finetune one stage, unlearn the forget set.

Both run unchanged in one process (`reteq run-path`) and inside Ray Train workers (`reteq sweep`); the
WorkerContext says which worker this is and whether DeepSpeed drives the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from reteq.algorithms import get_algorithm
from reteq.config import StageConfig, UnlearnConfig
from reteq.data.packing import layout_for, pack, packed_micro_batches, padding_fraction
from reteq.data.tokenize import Example, encode_dataset, micro_batches, plan_steps
from reteq.eval.evaluator import Evaluator, relative
from reteq.train.engine import OptimSpec, build_engine
from reteq.train.logprobs import batch_token_logps, sequence_logps
from reteq.train.loop import LoopResult, Step, StepRecord, train_loop
from reteq.train.precision import apply_matmul_policy, autocast


@dataclass(frozen=True)
class WorkerContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0  # rank among this machine's workers: local rank 0 fetches checkpoints for its machine
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ds_config: dict[str, Any] | None = None
    dtype: str = "fp32"
    # [packing hook] pack variable-length samples into rows (reteq.data.packing) instead of padding them;
    # same losses and gradients to float rounding. Set from `execution.packing` by whoever builds the context.
    packing: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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
        steps.append(Step(mbs, label_tokens, len(idx)))
    return steps


# the two optional hooks (logging; mid-stage resume, which needs the engine built here) follow the six inputs
# params: a stage's six inputs and its two optional hooks
def finetune_stage(model, tokenizer, stage: StageConfig, convs: list[dict], ctx: WorkerContext, seed: int,
                   on_step: Callable[[StepRecord], None] | None = None,
                   resume=None) -> tuple[torch.nn.Module, LoopResult, dict]:
    """Train one stage with a fresh optimizer and schedule; token-mean cross-entropy on response tokens.
    `resume` (reteq.sweep.stage_resume.StageResume, every rank): load its state and skip its steps, and save
    mid-stage checkpoints."""
    apply_matmul_policy(ctx.dtype)  # [precision hook] TF32 on only under dtype tf32
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
    result = train_loop(engine, steps, loss_fn, device=ctx.device, dtype=ctx.dtype, on_step=after_step,
                        first_step=resume.step if resume is not None else 0)
    pad = padding_fraction([b for s in steps for b in s.micro_batches])
    stats = {"steps": len(steps), "padding_fraction": pad, "examples": len(examples)}
    return engine.module, result, stats


@dataclass(frozen=True)
class UnlearnJob:
    """One unlearning run: the forget set, the method with its lr and knobs (e.g. {"beta": 0.5}), the seed."""

    cfg: UnlearnConfig
    algorithm: str
    lr: float
    params: Mapping[str, float]
    forget: list[dict]  # the forget set's conversations
    seed: int = 0


def micro_batch_loss(loss, logp: torch.Tensor, ref: torch.Tensor | None, params: Mapping[str, float], step: Step,
                     normalisation: str) -> torch.Tensor:
    """One micro-batch's share of the step loss: its per-sequence losses summed, over the global batch's
    sequences (`sequence`: the mean per-sequence loss) or response tokens (`token`: for GA, the token-mean
    log-prob of the authors' NegCE loss, src/loss.py). `loss` returns the micro-batch's mean."""
    denominator = step.label_tokens if normalisation == "token" else step.sequences
    return loss(logp, ref, params) * (len(logp) / denominator)


@dataclass
class UnlearnResult:
    evals: list[tuple[int, dict[str, float]]]  # (step, metrics incl. relative scores), step 0 first
    loop: LoopResult
    steps: int
    vectors: Any = None  # polars frame of the probe's per-pair vectors (step x pair), set by pipeline.run_leaf

    @property
    def collapsed(self) -> bool:
        return self.loop.collapsed


@torch.no_grad()
def reference_logps(model, examples: list[Example], micro: int, pad_id: int, device,
                    packing: bool = False, dtype: str = "fp32") -> torch.Tensor:
    """Summed response log-prob of every forget example under the model before unlearning (NPO's pi_ref)."""
    from reteq.data.tokenize import collate

    was = model.training
    model.eval()
    out = torch.zeros(len(examples), dtype=torch.float64)
    for s in range(0, len(examples), micro):
        chunk = examples[s:s + micro]
        # [packing hook] the reference goes through the same path as the training steps
        batch = (pack(chunk, pad_id, layout=layout_for(model)) if packing else collate(chunk, pad_id)).to(device)
        with autocast(dtype, device):  # [precision hook] pi_ref under the same policy as the steps
            logp, _ = sequence_logps(model, batch)
        out[[e.index for e in chunk]] = logp.double().cpu()
    model.train(was)
    return out


def unlearn(model, tokenizer, job: UnlearnJob, evaluator: Evaluator, ctx: WorkerContext,
            on_eval: Callable[[int, dict[str, float]], None] | None = None,
            on_step: Callable[[StepRecord], None] | None = None) -> UnlearnResult:
    """Unlearn the forget set with a local method; evaluate at step 0 and every `eval_every` steps."""
    cfg, alg, params = job.cfg, get_algorithm(job.algorithm), dict(job.params)
    apply_matmul_policy(ctx.dtype)  # [precision hook]
    examples = encode_dataset(tokenizer, job.forget, cfg.max_length)
    accum = accumulation_steps(cfg.global_batch, cfg.micro_batch, ctx.world, "unlearn")
    index_steps = plan_steps(len(examples), cfg.epochs, cfg.global_batch, job.seed, cfg.steps)
    steps = build_steps(examples, index_steps, cfg.micro_batch, ctx, tokenizer.pad_token_id, model)
    ref = reference_logps(model, examples, cfg.micro_batch, tokenizer.pad_token_id, ctx.device, ctx.packing,
                          ctx.dtype) \
        if alg.needs_reference else None

    raw0 = evaluator.raw(model, ctx.device, ctx.dtype, step=0)
    evals = [(0, relative(raw0, raw0))]
    if on_eval:
        on_eval(0, evals[0][1])

    spec = OptimSpec(cfg.optimizer, job.lr, len(steps), cfg.schedule, cfg.warmup_frac, cfg.decay_frac,
                     cfg.min_lr_ratio, cfg.warmup_steps)
    normalisation = cfg.normalisation(job.algorithm)
    engine = build_engine(model, spec, ds_config=ctx.ds_config, micro_batch=cfg.micro_batch, accumulation=accum,
                          world=ctx.world)

    def loss_fn(m, batch, step: Step) -> torch.Tensor:
        logp, _ = sequence_logps(m, batch)
        r = ref[batch.index.cpu()].to(logp) if ref is not None else None
        return micro_batch_loss(alg.loss, logp, r, params, step, normalisation)

    def after_step(record: StepRecord) -> bool:
        if on_step:
            on_step(record)
        if record.step % cfg.eval_every == 0 or record.step == len(steps):
            metrics = relative(evaluator.raw(engine.module, ctx.device, ctx.dtype, step=record.step), raw0)
            evals.append((record.step, metrics))
            if on_eval:
                on_eval(record.step, metrics)
            return not all(math.isfinite(v) for v in metrics.values())
        return False

    loop = train_loop(engine, steps, loss_fn, device=ctx.device, dtype=ctx.dtype, on_step=after_step)
    if loop.stopped_early:  # evaluation went non-finite: treat as collapse, keep the last finite metrics
        loop.collapsed = True
        evals.pop()
    return UnlearnResult(evals, loop, len(steps))
