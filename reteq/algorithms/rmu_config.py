"""RMU's declaration (its loss: reteq/algorithms/rmu.py, which says what differs from the original)."""

from reteq.algorithms.method import Knob, Method, Need, retain_knobs

METHOD = Method(
    "rmu",
    label="RMU",
    summary="RMU: minimise sum_t mean_h (h_t - coeff u)^2 over response tokens' hidden states at `layer`.",
    formula="`mean_h (h_t - coeff u)^2` at hidden_states[`layer`] + loop's `retain_weight x` retain NLL",
    source="Li et al. 2024, arXiv:2403.03218 (WMDP); open-unlearning RMU (steering_coeff 20); LoRA/all "
           "parameters and an NLL retain term here",
    knobs={"layer": Knob(1, 0, doc="hidden_states index steered (0 = embeddings)"),
           "coeff": Knob(20.0, 0.0, low_open=True, doc="length of the control vector (tune per model)"),
           **retain_knobs()},
    needs={Need.HIDDEN, Need.RETAIN},
    normalisation="token",
)
