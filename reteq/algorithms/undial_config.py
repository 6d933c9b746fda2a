"""UNDIAL's declaration (its loss: reteq/algorithms/undial.py)."""

from reteq.algorithms.method import Knob, Method, Need

METHOD = Method(
    "undial",
    label="UNDIAL",
    summary="UNDIAL: minimise sum_t CE(z_t, softmax(z_ref,t - strength onehot(y_t))) over response tokens.",
    formula="`CE(z_t, softmax(z_ref,t - strength onehot(y_t)))`",
    source="Dong et al. 2024, arXiv:2402.10052; open-unlearning UNDIAL (compute_undial_loss, its `beta` 10.0)",
    knobs={"strength": Knob(10.0, 0.0, doc="how far the label's reference logit is lowered")},
    needs={Need.LOGITS, Need.REF_LOGITS},
    normalisation="token",
)
