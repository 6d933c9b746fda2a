"""Gradient ascent: push the forget responses' likelihood down without bound."""

from collections.abc import Mapping

import torch

from reteq.algorithms.base import MethodInputs, implements
from reteq.algorithms.ga_config import METHOD


@implements(METHOD)
def gradient_ascent(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """GA: minimise log pi(y|x), summed over the response (the authors normalise per response token)."""
    return x.seq_logp.sum()
