"""ME's declaration (its loss: reteq/algorithms/me.py)."""

from reteq.algorithms.method import Method, Need

METHOD = Method(
    "me",
    label="ME",
    summary="ME: minimise sum_t KL(Uniform || p_t) = sum_t (-log V - mean_v log p_t,v) over response tokens.",
    formula="`KL(Uniform_V ‖ p_t) = -log V - mean_v log softmax(z_t)_v`",
    source="Yuan et al. 2024, arXiv:2410.08109 (the forget term of ME+GD; their IdK goes with AP)",
    needs={Need.LOGITS},
    normalisation="token",
)
