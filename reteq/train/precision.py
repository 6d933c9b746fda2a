"""Precision policy: where the paper's fidelity (fp32) is traded for speed, and the CPU numerics around it.

Training precision is set per model (`ModelConfig.dtype`), evaluation precision per sweep (`eval.dtype`, default:
the model's); `reteq.train.recipes` applies them at the start of every finetuning stage and unlearning run.

fp32  fp32 weights and matmuls (TF32 off): the paper's setting, slowest on tensor-core GPUs (measured on one
      H200, Llama-3.2-1B LoRA r64: 7.4k tokens/s).
tf32  fp32 weights, TF32 tensor-core matmuls (10-bit mantissa inputs, fp32 accumulate): 3.4x fp32 there
      (25.2k tokens/s); log-probs drift slightly from fp32. On a CPU the same as fp32.
bf16  fp32 master weights, bf16 autocast for forward/backward: 5.4x fp32 there (40.4k tokens/s); log-probs
      differ from fp32 at the 1e-2 level, so compare runs (and paths) only within one policy. On a CPU with
      AMX or AVX512-BF16 units oneDNN runs bf16 matmuls natively: measured 1.5-1.9x fp32 for LoRA training and
      2.3-2.8x for scoring on SmolLM2-135M (docs/performance.md); without them bf16 is emulated and slower than
      fp32, so a CPU sweep asking for bf16 there is refused before it starts (reteq.hardware).
While bf16 autocast is on, a LoRA model's frozen base Linear weights are held in bf16 (`bf16_frozen_weights`):
autocast rounds them to bf16 at every matmul anyway, so the numbers are the same, without the per-matmul cast.

Denormals: a saturated loss (NPO/SimNPO far past its margin, GA on a label at log-prob -inf) gives subnormal
gradients, and x86 CPUs compute on subnormals about 25x slower. `execution.flush_denormal` (on by default for
CPU workers) flushes them to zero (FTZ/DAZ); it changes only numbers below 1.2e-38, and node and leaf keys record
it (reteq.plan.node_protocol). Trade-offs: docs/performance.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DTYPES = ("fp32", "tf32", "bf16")


def apply_matmul_policy(dtype: str) -> None:
    """TF32 matmuls and convolutions on under "tf32" only (process-wide: set at the start of every job)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown precision {dtype!r} (known: {', '.join(DTYPES)})")
    allow = dtype == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def apply_flush_denormal(on: bool) -> None:
    """Flush subnormal floats to zero on this process's CPU math (process-wide, so set at every job start: a warm
    worker runs jobs of several sweeps). A CPU without FTZ/DAZ support (not x86 SSE3) keeps denormals."""
    torch.set_flush_denormal(on)


def autocast(dtype: str, device: torch.device):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _frozen_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Linear layers whose weight is a frozen fp32 tensor, not tied to an embedding (a tied lm_head stays fp32,
    so the residual stream and the logits stay as under plain autocast) and not partitioned by ZeRO-3."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
            and m.weight.dtype == torch.float32 and id(m.weight) not in tied
            and getattr(m.weight, "ds_id", None) is None]


def _tied_frozen_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The output projection when it is a frozen fp32 Linear tied to the input embedding (SmolLM2, Llama-3.2-1B),
    else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return None
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    w = head.weight
    ok = id(w) in tied and not w.requires_grad and w.dtype == torch.float32 and getattr(w, "ds_id", None) is None
    return head if ok else None


def _dropout_free_lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """peft LoRA layers (duck-typed: precision stays peft-free) whose every adapter has no dropout."""
    return [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")
            and all(isinstance(d, torch.nn.Identity) for d in getattr(m, "lora_dropout", {}).values())]


class FrozenBase:
    """A LoRA model's frozen base Linear weights (and frozen biases), shown to the model in fp32 (the originals,
    never modified) or in bf16 (copies made once): `use("bf16")` while bf16 autocast computes, `use(other)` for
    an fp32/tf32 evaluation of the same model, `restore()` at the end.

    Same numbers as plain autocast (it rounds those weights to bf16 at every matmul anyway), without that cast
    per matmul and with half the weight bytes read: measured 1.13x train and 1.15x scoring over autocast alone
    on SmolLM2 (docs/performance.md). Only on a CPU device: the fp32 originals stay alive beside the copies
    (+50% of the base's memory), which a 14B base on a GPU cannot spare, and a GPU's casts are a small share of
    its matmul time (`enabled`: the caller's decision, WorkerContext.holds_bf16_base). A fully trainable model has
    nothing frozen and nothing changes.

    A frozen output projection tied to the input embedding is untied while bf16 computes: the embedding keeps the
    fp32 Parameter (so the residual stream stays fp32, as under plain autocast), the projection gets a bf16 copy.
    Autocast cast the whole 49k x 576 matrix at every forward before: 24% of greedy math generation on SmolLM2,
    where a forward is one token per row.

    Under bf16 it also turns off peft's cast of a LoRA layer's input to the adapter's fp32 dtype
    (`cast_input_dtype_enabled`): autocast casts that fp32 copy straight back to bf16, and bf16 -> fp32 -> bf16 is
    exact, so the numbers are the same without two full-activation copies per adapted Linear (the copies were 12%
    of bf16 scoring time on SmolLM2, docs/performance.md). Only on layers without LoRA dropout, whose random mask
    could depend on the input's dtype."""

    def __init__(self, model: torch.nn.Module, enabled: bool = True):
        self._layers = _frozen_linears(model) if enabled else []
        self._adapted = [(m, m.cast_input_dtype_enabled) for m in _dropout_free_lora_layers(model)] if enabled else []
        self._head = _tied_frozen_head(model) if enabled else None
        self._head_fp32 = self._head.weight if self._head is not None else None  # the tied Parameter itself
        self._head_bf16: torch.nn.Parameter | None = None
        self._fp32 = [(m.weight.data, m.bias.data if m.bias is not None and not m.bias.requires_grad else None)
                      for m in self._layers]
        self._bf16: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def __len__(self) -> int:
        return len(self._layers)

    def use(self, dtype: str) -> None:
        if dtype == "bf16" and self._bf16 is None:
            self._bf16 = [(w.to(torch.bfloat16), None if b is None else b.to(torch.bfloat16)) for w, b in self._fp32]
        tensors = self._bf16 if dtype == "bf16" else self._fp32
        for m, (weight, bias) in zip(self._layers, tensors or []):
            m.weight.data = weight
            if bias is not None:
                m.bias.data = bias
        for m, cast in self._adapted:
            m.cast_input_dtype_enabled = cast and dtype != "bf16"
        if self._head is not None:  # untied while bf16 computes; the embedding (and the residual stream) stays fp32
            if dtype == "bf16" and self._head_bf16 is None:
                self._head_bf16 = torch.nn.Parameter(self._head_fp32.detach().to(torch.bfloat16), requires_grad=False)
            self._head.weight = self._head_bf16 if dtype == "bf16" else self._head_fp32

    def restore(self) -> None:
        self.use("fp32")
        self._bf16 = self._head_bf16 = None


@contextlib.contextmanager
def frozen_base_in(model: torch.nn.Module, dtype: str, enabled: bool = True) -> Iterator[FrozenBase]:
    """`model`'s frozen base in bf16 while inside when `dtype` is "bf16" (FrozenBase), fp32 again on exit."""
    base = FrozenBase(model, enabled)
    base.use(dtype)
    try:
        yield base
    finally:
        base.restore()
