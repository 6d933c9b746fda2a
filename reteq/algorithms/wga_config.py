"""WGA's declaration (its loss: reteq/algorithms/wga.py)."""

from reteq.algorithms.method import Knob, Method, Need

METHOD = Method(
    "wga",
    label="WGA",
    summary="WGA: minimise sum_t p_t^beta log p_t over response tokens, the weight p_t^beta detached.",
    formula="`w_t log p_t`, `w_t = p_t^beta`",
    source="Wang et al. 2025, arXiv:2502.19301; open-unlearning WGA (compute_wga_loss, beta 1.0)",
    knobs={"beta": Knob(1.0, 0.0, doc="weight exponent (0: GA)")},
    needs={Need.TOKEN_LOGPS},
    normalisation="token",
)
