"""The registry every unlearning method enters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor | None, float | None], torch.Tensor]


@dataclass(frozen=True)
class Algorithm:
    name: str
    loss: LossFn
    uses_beta: bool = False
    default_beta: float | None = None
    needs_reference: bool = False  # True: the trainer precomputes ref_logp before the first step
    summary: str = ""


ALGORITHMS: dict[str, Algorithm] = {}


def register(name: str, *, uses_beta: bool = False, default_beta: float | None = None,
             needs_reference: bool = False) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        ALGORITHMS[name] = Algorithm(name, fn, uses_beta, default_beta, needs_reference,
                                     (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "")
        return fn

    return deco
