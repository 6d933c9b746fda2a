"""GradDiff (Liu et al., 2022; TOFU's Grad. Diff.): GA on the forget set plus NLL on a retain set.

    loss = sum_t log p_t  (GA, over the forget response tokens)  +  retain_weight x retain token-mean NLL

The forget term is GA's; the loop adds the retain term itself (reteq.train.recipes.unlearn, retain partners
from `unlearn.retain_stage`). At retain_weight 0 (the default) it IS GA: the paper's local setting. The loop
divides the forget sum by the global batch's response tokens (open-unlearning's -outputs.loss, a token mean).
"""

from collections.abc import Mapping

import torch

from reteq.algorithms.base import RETAIN_WEIGHT, MethodInputs, Need, register


@register("graddiff", label="GradDiff", defaults={RETAIN_WEIGHT: 0.0}, needs={Need.RETAIN}, normalisation="token",
          source="Liu et al. 2022, arXiv:2203.12817; Maini et al. 2024, arXiv:2401.06121 (TOFU); "
                 "open-unlearning GradDiff (alpha = retain_weight, NLL retain loss)")
def graddiff(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """GradDiff: GA's sum_t log p_t on the forget set; the loop adds retain_weight x the retain NLL."""
    return x.seq_logp.sum()
