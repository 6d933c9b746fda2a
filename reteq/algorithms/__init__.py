"""Local unlearning methods, one small file each with its formula and source (docs/methods.md lists them).

A method is `loss(x: MethodInputs, params) -> scalar`: the micro-batch's summed loss over the inputs it declared
(`Need`), with its knobs by name in `params` (reteq.algorithms.base explains the contract).
Register a new method with `@register(...)` in its own module and import it below.
"""

from reteq.algorithms import (  # noqa: F401  (registration side effects)
    ceu,
    ga,
    graddiff,
    idkdpo,
    idknll,
    me,
    npo,
    npo_retain,
    rmu,
    satimp,
    simnpo,
    undial,
    wga,
)
from reteq.algorithms.base import ALGORITHMS, RETAIN_WEIGHT, Algorithm, MethodInputs, Need, register

__all__ = ["ALGORITHMS", "RETAIN_WEIGHT", "Algorithm", "MethodInputs", "Need", "register", "get_algorithm"]


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r} (known: {', '.join(sorted(ALGORITHMS))})") from None
