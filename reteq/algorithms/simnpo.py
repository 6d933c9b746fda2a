"""SimNPO (Fan et al., 2024): NPO without a reference model."""

import torch
import torch.nn.functional as F

from reteq.algorithms.base import register


@register("simnpo", uses_beta=True, default_beta=1.0)
def simnpo(logp: torch.Tensor, ref_logp: torch.Tensor | None, beta: float | None):
    """SimNPO: minimise E[-(2/beta) log sigmoid(-beta log pi)] on the summed log-prob, as the authors' code."""
    if beta is None:
        raise ValueError("simnpo needs beta")
    return (-(2.0 / beta) * F.logsigmoid(-beta * logp)).mean()
