"""SimNPO: NPO without a reference model.

    loss = sum_i  -(2/beta) log sigmoid(-beta s_i),   s_i = log pi(y_i)            (length_norm 0, the default)
                                                      s_i = log pi(y_i) / |y_i|    (length_norm 1)

The default is the variant of the paper reteq reproduces (Yu et al. 2025; the authors' code applies NPO's loss
with log pi_ref = 0 to the response's SUMMED log-prob). Fan et al. 2024 (arXiv:2410.07163), who named SimNPO,
divide by the response length |y| (and add a reward margin gamma, 0 in several of their settings; beta 2.5 on
TOFU): that is `length_norm: 1`, without the margin. The two forms need different betas: the summed log-prob is
|y| times larger. Per sequence; the loop divides by the global batch's sequences.
"""

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from reteq.algorithms.base import MethodInputs, implements, knob
from reteq.algorithms.simnpo_config import METHOD


@implements(METHOD)
def simnpo(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """SimNPO: minimise -(2/beta) log sigmoid(-beta s) per sequence, s the summed log-prob (or its token mean)."""
    beta = knob(params, "beta", "simnpo")
    score = x.seq_logp
    if params.get("length_norm", 0):  # Fan et al.: log pi(y) / |y|
        score = score / x.seq_tokens.clamp_min(1).to(score)
    return (-(2.0 / beta) * F.logsigmoid(-beta * score)).sum()
