"""NPO with a retain term (Zhang et al., 2024, NPO+RT; open-unlearning's NPO): NPO's forget term plus NLL on a
retain set.

    loss = sum_i -(2/beta) log sigmoid(-beta (log pi(y_i) - log pi_ref(y_i)))  +  retain_weight x retain NLL

The forget term is reteq.algorithms.npo's; the loop adds the retain term (reteq.train.recipes.unlearn). At
retain_weight 0 (the default) it IS npo: the paper's local setting. Per sequence; the loop divides by the
global batch's sequences. The retain NLL is averaged as `retain_token_mean` says (docs/methods.md).
"""

from collections.abc import Mapping

import torch

from reteq.algorithms.base import MethodInputs, implements
from reteq.algorithms.npo import npo_terms
from reteq.algorithms.npo_retain_config import METHOD


@implements(METHOD)
def npo_retain(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """NPO+RT: NPO's -(2/beta) log sigmoid(-beta (log pi - log pi_ref)) per sequence, plus the loop's retain NLL."""
    return npo_terms(x, params, "npo_retain").sum()
