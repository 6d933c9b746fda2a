"""Negative Preference Optimization (Zhang et al., 2024): GA with a reference that bounds the push."""

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from reteq.algorithms.base import MethodInputs, Need, knob, register, required


def npo_terms(x: MethodInputs, params: Mapping[str, float], algorithm: str) -> torch.Tensor:
    """Per sequence: -(2/beta) log sigmoid(-beta (log pi - log pi_ref))."""
    beta = knob(params, "beta", algorithm)
    ref = required(x.ref_seq_logp, "reference log-probs", algorithm)
    return -(2.0 / beta) * F.logsigmoid(-beta * (x.seq_logp - ref))


@register("npo", defaults={"beta": 0.5}, needs={Need.REF_LOGPS},
          source="Zhang et al. 2024, arXiv:2404.05868; open-unlearning NPO; the paper's beta 0.5")
def npo(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """NPO: minimise -(2/beta) log sigmoid(-beta (log pi - log pi_ref)) per sequence."""
    return npo_terms(x, params, "npo").sum()
