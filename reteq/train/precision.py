"""Precision policy: where the paper's fidelity (fp32) is traded for speed. Set per model (`ModelConfig.dtype`);
`reteq.train.recipes` applies it at the start of every finetuning stage and unlearning run.

fp32  fp32 weights and matmuls (TF32 off): the paper's setting, slowest on tensor-core GPUs (measured on one
      H200, Llama-3.2-1B LoRA r64: 7.4k tokens/s).
tf32  fp32 weights, TF32 tensor-core matmuls (10-bit mantissa inputs, fp32 accumulate): 3.4x fp32 there
      (25.2k tokens/s); log-probs drift slightly from fp32.
bf16  fp32 master weights, bf16 autocast for forward/backward: 5.4x fp32 there (40.4k tokens/s); log-probs
      differ from fp32 at the 1e-2 level, so compare runs (and paths) only within one policy.
On CPU, tf32 is the same as fp32 and bf16 autocast is usually slower than fp32. Trade-offs: docs/performance.md.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = ("fp32", "tf32", "bf16")


def apply_matmul_policy(dtype: str) -> None:
    """TF32 matmuls and convolutions on under "tf32" only (process-wide: set at the start of every job)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown precision {dtype!r} (known: {', '.join(DTYPES)})")
    allow = dtype == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def autocast(dtype: str, device: torch.device):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def frozen_linears_to_bf16(model: torch.nn.Module) -> int:
    """Under the bf16 policy, store frozen Linear weights (a LoRA model's base) in bf16; returns how many.

    Same numbers: autocast rounds those weights to bf16 at every matmul anyway. What changes: half the weight
    memory and no fp32->bf16 weight cast per forward. Weights tied to an embedding (a tied lm_head) stay fp32,
    so the residual stream stays fp32 as under plain autocast. Only for dtype "bf16" with autocast on.
    """
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = 0
    for m in model.modules():
        if not isinstance(m, torch.nn.Linear) or m.weight.requires_grad or id(m.weight) in tied:
            continue
        m.weight.data = m.weight.data.to(torch.bfloat16)
        if m.bias is not None and not m.bias.requires_grad:
            m.bias.data = m.bias.data.to(torch.bfloat16)
        n += 1
    return n
