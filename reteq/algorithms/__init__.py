"""Local unlearning methods: forget-set-only losses over sequence log-probs, one small file each.

A method is a function `loss(batch_logp, ref_logp, params) -> scalar` where `batch_logp[i]` is the summed
log-prob of response i under the current model, `ref_logp[i]` the same under the model before unlearning,
and `params` the method's knobs by name (e.g. {"beta": 0.5}; GA has none).
Register a new method with `@register(...)` in its own module and import it below.
"""

from reteq.algorithms import ga, npo, simnpo  # noqa: F401  (registration side effects)
from reteq.algorithms.base import ALGORITHMS, Algorithm, register

__all__ = ["ALGORITHMS", "Algorithm", "register", "get_algorithm"]


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r} (known: {', '.join(sorted(ALGORITHMS))})") from None
