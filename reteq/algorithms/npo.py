"""Negative Preference Optimization (Zhang et al., 2024): GA with a reference that bounds the push."""

import torch
import torch.nn.functional as F

from reteq.algorithms.base import register


@register("npo", uses_beta=True, default_beta=0.5, needs_reference=True)
def npo(logp: torch.Tensor, ref_logp: torch.Tensor | None, beta: float | None):
    """NPO: minimise E[-(2/beta) log sigmoid(-beta (log pi - log pi_ref))]."""
    if ref_logp is None or beta is None:
        raise ValueError("npo needs ref_logp and beta")
    return (-(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp))).mean()
