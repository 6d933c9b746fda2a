"""GradDiff (Liu et al., 2022; TOFU's Grad. Diff.): GA on the forget set plus NLL on a retain set.

    loss = sum_t log p_t  (GA, over the forget response tokens)  +  retain_weight x retain NLL

The forget term is GA's; the loop adds the retain term itself (reteq.train.recipes.unlearn, retain partners
from `unlearn.retain_stage`). At retain_weight 0 (the default) it IS GA: the paper's local setting. The loop
divides the forget sum by the global batch's response tokens (open-unlearning's -outputs.loss, a token mean).
The retain NLL is averaged as `retain_token_mean` says (docs/methods.md): by default the mean of each retain
sequence's token mean; 1 gives open-unlearning's token mean over the batch's retain tokens.
"""

from collections.abc import Mapping

import torch

from reteq.algorithms.base import MethodInputs, implements
from reteq.algorithms.graddiff_config import METHOD


@implements(METHOD)
def graddiff(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """GradDiff: GA's sum_t log p_t on the forget set; the loop adds retain_weight x the retain NLL."""
    return x.seq_logp.sum()
