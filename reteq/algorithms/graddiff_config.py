"""GradDiff's declaration (its loss: reteq/algorithms/graddiff.py)."""

from reteq.algorithms.method import Method, Need, retain_knobs

METHOD = Method(
    "graddiff",
    label="GradDiff",
    summary="GradDiff: GA's sum_t log p_t on the forget set; the loop adds retain_weight x the retain NLL.",
    formula="`log p_t` (GA) + loop's `retain_weight x` retain NLL",
    source="Liu et al. 2022, arXiv:2203.12817; TOFU; open-unlearning GradDiff (alpha = retain_weight)",
    knobs=retain_knobs(),
    needs={Need.RETAIN},
    normalisation="token",
)
