"""Section 3 of the paper: staged ridge regression, local unlearning, and the Theorem 3.1 divergence bound.

linear  closed forms of the two-stage setting and the theorem's quantities (numpy only)
beyond  K-stage orders, the exact retrain baseline, NPO-like and SimNPO-like rules
grid    the grid of random instances as a Ray Tune experiment logged to MLflow (`reteq theory`)
report  the report section read back from MLflow
grid and report import Ray / MLflow / altair lazily, so `import reteq.theory` stays cheap.
"""

from reteq.theory.linear import (
    Instance,
    TheoremQuantities,
    bound_check,
    make_instance,
    re_distance,
    theorem_quantities,
)

__all__ = [
    "Instance",
    "TheoremQuantities",
    "bound_check",
    "make_instance",
    "re_distance",
    "theorem_quantities",
]
