"""ME, maximum entropy (Yuan et al., 2024, "A Closer Look at Machine Unlearning for LLMs"): make every response
token's prediction uniform.

    loss = sum_t  KL(Uniform_V || p_t) = sum_t ( -log V - (1/V) sum_v log softmax(z_t)_v )

Zero when the model predicts nothing at the forget positions; it bounds the push where GA diverges (the label's
log-prob tends to -log V, not -inf). Summed over response tokens; the loop divides by the global batch's response
tokens (the paper's per-token mean). Yuan et al. pair ME with GD on the retain set (ME+GD; AP, answer
preservation, goes with their IdK objective); reteq's `me` is the forget term alone, the paper's local setting.
"""

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from reteq.algorithms.base import MethodInputs, implements, required
from reteq.algorithms.me_config import METHOD


@implements(METHOD)
def maximum_entropy(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """ME: minimise sum_t KL(Uniform || p_t) = sum_t (-log V - mean_v log p_t,v) over response tokens."""
    logits = required(x.logits, "logits", "me")
    vocab = logits.size(-1)
    return (-math.log(vocab) - F.log_softmax(logits, dim=-1).mean(-1)).sum()
