"""SatImp's declaration (its loss: reteq/algorithms/satimp.py)."""

from reteq.algorithms.method import Knob, Method, Need

METHOD = Method(
    "satimp",
    label="SatImp",
    summary="SatImp: minimise sum_t p_t^beta1 (1 - p_t)^beta2 log p_t over response tokens, the weight detached.",
    formula="`w_t log p_t`, `w_t = p_t^beta1 (1 - p_t)^beta2`",
    source="Yang et al. 2025, arXiv:2505.11953; open-unlearning SatImp (compute_satimp_loss, beta1 5.0, beta2 1.0)",
    knobs={"beta1": Knob(5.0, 0.0, doc="saturation exponent"), "beta2": Knob(1.0, 0.0, doc="importance exponent")},
    needs={Need.TOKEN_LOGPS},
    normalisation="token",
)
