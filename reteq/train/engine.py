"""Engines: who owns backward and the optimizer step. The training loop talks only to this interface.

PlainEngine      torch AdamW/SGD + LambdaLR; gradient accumulation by calling backward several times; several
                 workers (deepspeed: null) sum their gradients before the step.
DeepSpeedEngine  `deepspeed.initialize` with a client torch optimizer (no C++ op compile) and our schedule;
                 ZeRO stage and precision come from a JSON in configs/deepspeed/. Runs on CPU with gloo too.
Both are built fresh for every stage: the paper re-initialises the optimizer and schedule at each stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from reteq.train.collectives import all_reduce_grads, import_deepspeed
from reteq.train.schedules import lr_multiplier


@dataclass(frozen=True)
class OptimSpec:
    name: str  # adamw | sgd
    lr: float
    total_steps: int
    schedule: str = "constant"
    warmup_frac: float = 0.0
    decay_frac: float = 0.0
    min_lr_ratio: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_frac


def make_optimizer(params, spec: OptimSpec) -> torch.optim.Optimizer:
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr)
    return torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def make_scheduler(opt: torch.optim.Optimizer, spec: OptimSpec) -> torch.optim.lr_scheduler.LambdaLR:
    def f(step: int) -> float:
        return lr_multiplier(step, spec.total_steps, spec.schedule, spec.warmup_frac, spec.decay_frac,
                             spec.min_lr_ratio, spec.warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


class PlainEngine:
    """Several workers (`world` > 1, deepspeed: null): each backward adds this rank's share of the global loss,
    and the step first sums the gradients over the ranks, so every rank takes the same step as one worker."""

    def __init__(self, model: torch.nn.Module, spec: OptimSpec, world: int = 1):
        self.model = model
        self.module = model
        self.world = world
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, spec)
        self.scheduler = make_scheduler(self.optimizer, spec)
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def micro_step(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> float:
        if self.world > 1:
            all_reduce_grads(self.params)
        norm = _grad_norm(self.params)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


class DeepSpeedEngine:
    """Loss scaling: the loop weights each micro-batch by its share of the *global* step, so the workers'
    contributions sum to the step loss. DeepSpeed averages gradients over workers, so backward runs on
    loss x world (and with scale_wrt_gas=False: accumulation is already in the weights)."""

    def __init__(self, model: torch.nn.Module, spec: OptimSpec, ds_config: dict[str, Any], micro_batch: int,
                 accumulation: int, world: int):
        deepspeed = import_deepspeed()
        cfg = dict(ds_config)
        cfg["train_micro_batch_size_per_gpu"] = micro_batch
        cfg["gradient_accumulation_steps"] = accumulation
        cfg["train_batch_size"] = micro_batch * accumulation * world
        cfg.setdefault("steps_per_print", 10**9)
        cfg.setdefault("wall_clock_breakdown", False)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, spec)
        scheduler = make_scheduler(optimizer, spec)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, model_parameters=params, config=cfg)
        self.module = self.model.module
        self.zero_stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
        self.world = world

    @property
    def lr(self) -> float:
        return float(self.model.get_lr()[0])

    def micro_step(self, loss: torch.Tensor) -> None:
        self.model.backward(loss * self.world, scale_wrt_gas=False)
        self.model.step()  # DeepSpeed applies the update only at the accumulation boundary

    def optimizer_step(self) -> float:
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None and math.isfinite(float(norm)) else float("nan")


def build_engine(model, spec: OptimSpec, *, ds_config: dict[str, Any] | None, micro_batch: int,
                 accumulation: int, world: int):
    if ds_config is None:
        return PlainEngine(model, spec, world)
    return DeepSpeedEngine(model, spec, ds_config, micro_batch, accumulation, world)
