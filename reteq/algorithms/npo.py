"""Negative Preference Optimization (Zhang et al., 2024): GA with a reference that bounds the push."""

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from reteq.algorithms.base import MethodInputs, implements, knob, required
from reteq.algorithms.npo_config import METHOD


def npo_terms(x: MethodInputs, params: Mapping[str, float], algorithm: str) -> torch.Tensor:
    """Per sequence: -(2/beta) log sigmoid(-beta (log pi - log pi_ref))."""
    beta = knob(params, "beta", algorithm)
    ref = required(x.ref_seq_logp, "reference log-probs", algorithm)
    return -(2.0 / beta) * F.logsigmoid(-beta * (x.seq_logp - ref))


@implements(METHOD)
def npo(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """NPO: minimise -(2/beta) log sigmoid(-beta (log pi - log pi_ref)) per sequence."""
    return npo_terms(x, params, "npo").sum()
