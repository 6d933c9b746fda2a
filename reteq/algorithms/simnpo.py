"""SimNPO (Fan et al., 2024): NPO without a reference model."""

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from reteq.algorithms.base import knob, register


@register("simnpo", defaults={"beta": 1.0})
def simnpo(logp: torch.Tensor, ref_logp: torch.Tensor | None, params: Mapping[str, float]):
    """SimNPO: minimise E[-(2/beta) log sigmoid(-beta log pi)] on the summed log-prob, as the authors' code."""
    beta = knob(params, "beta", "simnpo")
    return (-(2.0 / beta) * F.logsigmoid(-beta * logp)).mean()
