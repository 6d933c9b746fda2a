"""Learning-rate schedules as multipliers of the peak lr, re-created at every stage (the paper's protocol).

wsd       warmup (linear from 0) -> stable at peak -> linear decay to `min_ratio` of peak over the last
          `decay_frac` of steps. The paper: 2% warmup, 2% decay; the authors' code decays to 0.1 of peak.
cosine    warmup then cosine decay to `min_ratio` (the paper's ablation, Fig. 8).
constant  warmup then flat.
"""

from __future__ import annotations

import math


def lr_multiplier(step: int, total: int, schedule: str, warmup_frac: float = 0.0, decay_frac: float = 0.0,
                  min_ratio: float = 0.0) -> float:
    """Multiplier for optimizer step `step` (0-based) of `total`."""
    total = max(1, total)
    warmup = int(math.ceil(warmup_frac * total)) if warmup_frac > 0 else 0
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay = int(math.ceil(decay_frac * total)) if decay_frac > 0 else 0
        start = total - decay
        if decay == 0 or step < start:
            return 1.0
        progress = (step - start + 1) / decay
        return 1.0 - (1.0 - min_ratio) * progress
    raise ValueError(f"unknown schedule {schedule!r}")
