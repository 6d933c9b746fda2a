"""SatImp (Yang et al., 2025): token-weighted GA that favours tokens neither saturated nor already forgotten.

    loss = sum_t  w_t log p_t,   w_t = p_t^beta1 (1 - p_t)^beta2  (detached)

The saturation factor p^beta1 (as WGA) fades tokens already pushed down; the importance factor (1 - p)^beta2
fades tokens the model is sure of. Summed over response tokens; the loop divides by the global batch's response
tokens (open-unlearning's mean over tokens).
"""

from collections.abc import Mapping

import torch

from reteq.algorithms.base import MethodInputs, implements, knob, required
from reteq.algorithms.satimp_config import METHOD


@implements(METHOD)
def satimp(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """SatImp: minimise sum_t p_t^beta1 (1 - p_t)^beta2 log p_t over response tokens, the weight detached."""
    beta1, beta2 = knob(params, "beta1", "satimp"), knob(params, "beta2", "satimp")
    logp = required(x.token_logp, "token log-probs", "satimp")
    lp = logp.detach()
    weight = torch.exp(beta1 * lp) * (-torch.expm1(lp)) ** beta2  # p^b1 (1 - p)^b2
    return (weight * logp).sum()
