"""Precision policy: where the paper's fidelity (fp32) is traded for speed.

fp32  fp32 weights and matmuls (TF32 off): the paper's setting, slowest on tensor-core GPUs (~3x below tf32).
tf32  fp32 weights, TF32 tensor-core matmuls (10-bit mantissa inputs): ~3x faster on Ampere+, tiny drift.
bf16  fp32 master weights, bf16 autocast for forward/backward: fastest (~5x fp32 on H100/H200); log-probs
      differ from fp32 at the 1e-2 level, so compare runs only within one policy.
"""

from __future__ import annotations

import contextlib

import torch


def apply_matmul_policy(dtype: str) -> None:
    allow = dtype == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def autocast(dtype: str, device: torch.device):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
