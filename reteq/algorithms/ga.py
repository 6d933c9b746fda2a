"""Gradient ascent: push the forget responses' likelihood down without bound."""

from collections.abc import Mapping

import torch

from reteq.algorithms.base import register


@register("ga")
def gradient_ascent(logp: torch.Tensor, ref_logp: torch.Tensor | None = None, params: Mapping[str, float] | None = None):
    """GA: minimise E[log pi(y|x)] (summed response log-prob)."""
    return logp.mean()
