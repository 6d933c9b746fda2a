"""IdkDPO's declaration (its loss: reteq/algorithms/idkdpo.py)."""

from reteq.algorithms.method import Knob, Method, Need

METHOD = Method(
    "idkdpo",
    label="IdkDPO",
    summary="IdkDPO: minimise -(2/beta) log sigmoid(beta ((alt - ref_alt) - (logp - ref))) per sequence.",
    formula="`-(2/beta) log sigmoid(beta ((log pi(a) - log pi_ref(a)) - (log pi(y) - log pi_ref(y))))`",
    source="Rafailov et al. 2023, arXiv:2305.18290; TOFU IdkDPO; open-unlearning DPO (compute_dpo_loss, beta 0.1)",
    knobs={"beta": Knob(0.1, 0.0, low_open=True, doc="inverse temperature (open-unlearning's 0.1)")},
    needs={Need.ALTERNATIVE, Need.REF_LOGPS},
)
