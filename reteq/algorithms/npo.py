"""Negative Preference Optimization (Zhang et al., 2024): GA with a reference that bounds the push."""

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from reteq.algorithms.base import knob, register


@register("npo", defaults={"beta": 0.5}, needs_reference=True)
def npo(logp: torch.Tensor, ref_logp: torch.Tensor | None, params: Mapping[str, float]):
    """NPO: minimise E[-(2/beta) log sigmoid(-beta (log pi - log pi_ref))]."""
    if ref_logp is None:
        raise ValueError("npo needs ref_logp")
    beta = knob(params, "beta", "npo")
    return (-(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp))).mean()
