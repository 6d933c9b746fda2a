"""The registry every unlearning method enters."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

# loss(logp, ref_logp, params): params holds the method's knobs by name, e.g. {"beta": 0.5}; {} for GA
LossFn = Callable[[torch.Tensor, torch.Tensor | None, Mapping[str, float]], torch.Tensor]


@dataclass(frozen=True)
class Algorithm:
    name: str
    loss: LossFn
    defaults: Mapping[str, float] = field(default_factory=dict)  # its knobs and their paper values
    needs_reference: bool = False  # True: the trainer precomputes ref_logp before the first step
    summary: str = ""

    @property
    def uses_beta(self) -> bool:
        """Whether the sweep's `beta` grid (and Tune axis) applies to this method."""
        return "beta" in self.defaults

    @property
    def default_beta(self) -> float | None:
        return self.defaults.get("beta")


ALGORITHMS: dict[str, Algorithm] = {}


def register(name: str, *, defaults: Mapping[str, float] | None = None,
             needs_reference: bool = False) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        known = ALGORITHMS.get(name)
        if known is not None and _origin(known.loss) != _origin(fn):  # a module reloaded registers its own again
            raise ValueError(f"algorithm {name!r} is already registered by {_origin(known.loss)}; "
                             f"{_origin(fn)} must use another name")
        ALGORITHMS[name] = Algorithm(name, fn, dict(defaults or {}), needs_reference,
                                     (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "")
        return fn

    return deco


def _origin(fn: LossFn) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def knob(params: Mapping[str, float], name: str, algorithm: str) -> float:
    """A method's knob from its params, or a clear error naming both."""
    value = params.get(name)
    if value is None:
        raise ValueError(f"{algorithm} needs {name}")
    return float(value)
