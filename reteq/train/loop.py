"""The one training loop. Finetuning and unlearning differ only in the loss function and the step callback.

A step is a list of this worker's micro-batches; the loss function returns each micro-batch's contribution to
the *global* step loss (already weighted by its share), so accumulation and data parallelism add up to the
same gradient as one big batch.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from reteq.data.tokenize import Batch
from reteq.train.collectives import all_reduce_sum
from reteq.train.precision import autocast


@dataclass
class Step:
    """One optimizer step: this worker's micro-batches, plus global sizes that normalise the loss."""

    micro_batches: list[Batch]
    label_tokens: int  # response tokens in the whole global batch (all workers)
    sequences: int  # sequences in the whole global batch
    index: tuple[int, ...] = ()  # the whole global batch's example indices (what a step-wide mean reads)


LossFn = Callable[[torch.nn.Module, Batch, Step], torch.Tensor]


@dataclass
class StepRecord:
    step: int  # 1-based optimizer step
    loss: float
    lr: float
    grad_norm: float
    tokens: int  # real tokens this worker processed in the step
    padded_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class LoopResult:
    records: list[StepRecord] = field(default_factory=list)
    collapsed: bool = False  # a non-finite loss stopped the loop; records hold only finite steps
    stopped_early: bool = False


def micro_batch_seed(seed: int, step: int, slot: int) -> int:
    """The torch seed of one micro-batch's forward (its dropout masks): the run's seed (a node's comes from its
    key), the step and the micro-batch's slot in the global step. Never the rank: a micro-batch draws the same
    masks whether one worker accumulates it or another worker of N takes it."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{slot}".encode()).digest()[:8], "little") >> 1


# the engine, its steps and loss, where they run (device, precision), then three knobs of the run
# params: the step callback, the resume point and the dropout seed
def train_loop(engine, steps: list[Step], loss_fn: LossFn, *, device: torch.device, dtype: str = "fp32",
               on_step: Callable[[StepRecord], bool | None] | None = None, first_step: int = 0,
               seed: int = 0) -> LoopResult:
    """Run every step; `on_step` may return True to stop early (e.g. after a collapse seen in evaluation).
    `first_step`: steps already done (a resumed stage, its engine state loaded): they are skipped, and the
    records continue from first_step + 1. `seed`: each micro-batch's forward runs under
    `micro_batch_seed(seed, step, slot)`, in a forked RNG (the caller's random state is left as it was)."""
    result = LoopResult()
    engine.model.train()
    forked = [device] if device.type == "cuda" else []
    for i, step in enumerate(steps[first_step:], start=first_step + 1):
        start = time.perf_counter()
        lr = engine.lr
        step_loss, tokens, padded = 0.0, 0, 0
        for batch in step.micro_batches:
            batch = batch.to(device)
            with torch.random.fork_rng(devices=forked), autocast(dtype, device):
                torch.manual_seed(micro_batch_seed(seed, i, batch.slot))
                loss = loss_fn(engine.model, batch, step)
            value = float(loss.detach())
            if not math.isfinite(all_reduce_sum(0.0 if math.isfinite(value) else math.inf, device)):
                result.collapsed = True
                return result
            engine.micro_step(loss)
            step_loss += value
            tokens += batch.n_tokens
            padded += batch.input_ids.numel()
        grad_norm = engine.optimizer_step()
        record = StepRecord(i, all_reduce_sum(step_loss, device), lr, grad_norm, tokens, padded,
                            time.perf_counter() - start)
        result.records.append(record)
        if on_step is not None and on_step(record):
            result.stopped_early = True
            break
    return result
