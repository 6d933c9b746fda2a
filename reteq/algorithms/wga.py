"""Weighted Gradient Ascent (Wang et al., 2025): GA on each response token, weighted by its own probability.

    loss = sum_t  w_t log p_t,   w_t = p_t^beta  (detached)

A token the model has already pushed down (small p_t) gets a small weight, so the ascent concentrates on the
tokens still likely and slows down as the response is forgotten (beta 0 is GA). Summed over the micro-batch's
response tokens; the loop divides by the global batch's response tokens (open-unlearning's mean over tokens).
"""

from collections.abc import Mapping

import torch

from reteq.algorithms.base import MethodInputs, implements, knob, required
from reteq.algorithms.wga_config import METHOD


@implements(METHOD)
def wga(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """WGA: minimise sum_t p_t^beta log p_t over response tokens, the weight p_t^beta detached."""
    beta = knob(params, "beta", "wga")
    logp = required(x.token_logp, "token log-probs", "wga")
    weight = torch.exp(beta * logp.detach())  # p^beta, computed in log space
    return (weight * logp).sum()
