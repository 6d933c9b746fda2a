"""IdkDPO (Rafailov et al., 2023 DPO; Maini et al., 2024 TOFU): prefer the "I don't know" alternative over the
forget response, relative to the start checkpoint.

    loss = sum_i  -(2/beta) log sigmoid(beta ((log pi(a_i) - log pi_ref(a_i)) - (log pi(y_i) - log pi_ref(y_i))))

win a_i = the prompt's alternative answer (reteq.data.alternatives), lose y_i = the forget response; summed
log-probs as open-unlearning's compute_dpo_loss (its 2/beta scale too). pi_ref is the leaf's start checkpoint,
computed once (reteq.train.reference). beta 0.1 is open-unlearning's configs/trainer/DPO.yaml. At the reference
the loss is (2/beta) ln 2 per sequence. Per sequence; the loop divides by the global batch's sequences.
"""

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from reteq.algorithms.base import MethodInputs, implements, knob, required
from reteq.algorithms.idkdpo_config import METHOD


@implements(METHOD)
def idkdpo(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """IdkDPO: minimise -(2/beta) log sigmoid(beta ((alt - ref_alt) - (logp - ref))) per sequence."""
    beta = knob(params, "beta", "idkdpo")
    ref = required(x.ref_seq_logp, "reference log-probs", "idkdpo")
    alt = required(x.alt_seq_logp, "alternative log-probs", "idkdpo")
    ref_alt = required(x.ref_alt_seq_logp, "reference alternative log-probs", "idkdpo")
    margin = (alt - ref_alt) - (x.seq_logp - ref)
    return (-(2.0 / beta) * F.logsigmoid(beta * margin)).sum()
