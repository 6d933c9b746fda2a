"""`WorkerContext`: which worker a job runs on (rank, world, device, DeepSpeed config) and the numerics it runs
under (training and evaluation precision, packing, denormals).

Built by `WorkerContext.for_model` from the sweep config plus where the worker is: in a sweep by
reteq.sweep.rank.worker_context (every node, leaf and record task, every Ray Train worker), in one process by
`reteq run-path` (reteq.commands.run_path). The jobs (reteq.train.recipes) and the pipeline read it, never build it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from reteq.config import SweepConfig
from reteq.train.precision import apply_flush_denormal, apply_matmul_policy


@dataclass(frozen=True)
class WorkerContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0  # rank among this machine's workers: local rank 0 fetches checkpoints for its machine
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ds_config: dict[str, Any] | None = None
    dtype: str = "fp32"  # training precision (reteq.train.precision)
    # [packing hook] pack variable-length samples into rows (reteq.data.packing) instead of padding them;
    # same losses and gradients to float rounding. Set from `execution.packing` by whoever builds the context.
    packing: bool = True
    eval_dtype: str | None = None  # evaluation precision; None: `dtype`
    flush_denormal: bool = False  # flush subnormals to zero on this CPU (execution.flush_denormal, CPU workers)

    @classmethod
    def for_model(cls, cfg: SweepConfig, model: str, **where: Any) -> WorkerContext:
        """The context of a job on `model` of sweep `cfg`: its precisions, packing and denormal setting from the
        config; `where` says which worker this is (rank, world, local_rank, device, ds_config)."""
        device = where.get("device", torch.device("cpu"))
        return cls(dtype=cfg.model(model).dtype, eval_dtype=cfg.eval.dtype, packing=cfg.execution.packing,
                   flush_denormal=cfg.execution.flush_denormal and device.type == "cpu", **where)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def scoring_dtype(self) -> str:
        return self.eval_dtype or self.dtype

    @property
    def holds_bf16_base(self) -> bool:
        """Whether a LoRA base is held in bf16 while bf16 computes (reteq.train.precision.FrozenBase): on a CPU,
        where the cast per matmul is a visible cost, and not under ZeRO-3, whose partitioned weights are no
        plain tensors to swap."""
        zero = int((self.ds_config or {}).get("zero_optimization", {}).get("stage", 0))
        return self.device.type == "cpu" and zero < 3 and "bf16" in (self.dtype, self.scoring_dtype)

    def apply_numerics(self) -> None:
        """At every job start (process-wide settings; a warm worker runs jobs of several sweeps): TF32 as the
        training precision says, denormals flushed or not."""
        apply_matmul_policy(self.dtype)
        apply_flush_denormal(self.flush_denormal)
