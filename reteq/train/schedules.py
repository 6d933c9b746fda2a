"""Learning-rate schedules as multipliers of the peak lr, re-created at every stage (the paper's protocol).

wsd       the authors' `get_wsd` (src/schedulers.py): linear warmup from 0 over `int(warmup_frac * total)`
          steps (or `warmup_steps`), stable at peak, then over the last `int(decay_frac * total)` steps a linear
          decay towards `min_ratio` (0.1 in their code): multiplier min + (1 - min) (total - step) / decay.
          The paper: 2% warmup, 2% decay; their unlearn config: 5 warmup steps, decay_frac 0.8.
cosine    torchtune's `get_cosine_schedule_with_warmup` (the authors' finetune config): warmup `step / warmup`
          (0 at step 0) over `int(warmup_frac * total)` steps (or `warmup_steps`), then a half cosine from the
          peak to 0 over the remaining steps; `min_ratio` does not apply (the paper's ablation, Fig. 8).
constant  warmup (step + 1) / (warmup + 1) over ceil(warmup_frac * total) steps, then flat.
"""

from __future__ import annotations

import math


def lr_multiplier(step: int, total: int, schedule: str, warmup_frac: float = 0.0, decay_frac: float = 0.0,
                  min_ratio: float = 0.0, warmup_steps: int | None = None) -> float:
    """Multiplier for optimizer step `step` (0-based) of `total`."""
    total = max(1, total)
    if schedule == "wsd":
        return _wsd(step, total, warmup_steps if warmup_steps is not None else int(warmup_frac * total),
                    int(decay_frac * total), min_ratio)
    if schedule == "cosine":
        return _cosine(step, total, warmup_steps if warmup_steps is not None else int(warmup_frac * total))
    if warmup_steps is not None:
        warmup = warmup_steps
    else:
        warmup = int(math.ceil(warmup_frac * total)) if warmup_frac > 0 else 0
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}")


def _wsd(step: int, total: int, warmup: int, decay: int, min_ratio: float) -> float:
    """The authors' get_wsd lambda: warmup step/warmup (0 at step 0), decay after step total - decay."""
    if step < warmup:
        return step / max(1, warmup)
    if decay > 0 and step > total - decay:
        return min_ratio + max((1 - min_ratio) * (total - step) / decay, 0.0)
    return 1.0


def _cosine(step: int, total: int, warmup: int) -> float:
    """torchtune's get_cosine_schedule_with_warmup lambda (num_cycles 0.5): to 0 at step `total`."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
