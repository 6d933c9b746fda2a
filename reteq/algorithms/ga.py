"""Gradient ascent: push the forget responses' likelihood down without bound."""

from collections.abc import Mapping

import torch

from reteq.algorithms.base import MethodInputs, register


@register("ga", normalisation="token",
          source="the paper's GA; authors' NegCE loss (src/loss.py); open-unlearning GradAscent")
def gradient_ascent(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """GA: minimise log pi(y|x), summed over the response (the authors normalise per response token)."""
    return x.seq_logp.sum()
