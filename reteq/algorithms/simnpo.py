"""SimNPO (Fan et al., 2024): NPO without a reference model."""

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from reteq.algorithms.base import MethodInputs, knob, register


@register("simnpo", defaults={"beta": 1.0},
          source="Fan et al. 2024, arXiv:2410.07163; the authors' code (summed log-prob, no length norm)")
def simnpo(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """SimNPO: minimise -(2/beta) log sigmoid(-beta log pi) per sequence, on the summed log-prob as the authors."""
    beta = knob(params, "beta", "simnpo")
    return (-(2.0 / beta) * F.logsigmoid(-beta * x.seq_logp)).sum()
