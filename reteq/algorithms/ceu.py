"""CE-U, cross-entropy unlearning (Yang, 2025): cross-entropy towards the model's own distribution with
the label removed.

    loss = sum_{t >= ignore_first}  CE(z_t, softmax(stopgrad(z_t) with z_t[y_t] = -inf))

The target is the model's current prediction renormalised over every token but the one to forget, so the
gradient, softmax(z_t) - target, only moves mass off y_t (it vanishes as p(y_t) -> 0 instead of diverging like
GA's). The first `ignore_first` response tokens of each sequence are left out, as in the paper's footnote and
open-unlearning's `ignore_first_n_answer_tokens` (1). Summed over the kept tokens; the loop divides by all the
global batch's response tokens (open-unlearning divides by the kept ones: a constant factor per batch).
"""

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from reteq.algorithms.base import MethodInputs, implements, knob, required
from reteq.algorithms.ceu_config import METHOD


def position_in_sequence(owner: torch.Tensor) -> torch.Tensor:
    """(N,) each token's position among its sequence's response tokens (a sequence's tokens are contiguous)."""
    n = owner.numel()
    if n == 0:
        return owner.clone()
    new = torch.ones(n, dtype=torch.bool, device=owner.device)
    new[1:] = owner[1:] != owner[:-1]
    starts = new.nonzero().squeeze(-1)
    run = new.long().cumsum(0) - 1
    return torch.arange(n, device=owner.device) - starts[run]


@implements(METHOD)
def ceu(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """CE-U: minimise sum_t CE(z_t, softmax(stopgrad(z_t) with the label at -inf)) past ignore_first tokens.

    Each sequence's first `ignore_first` response tokens are left out."""
    skip = int(knob(params, "ignore_first", "ceu"))
    logits = required(x.logits, "logits", "ceu")
    labels = required(x.labels, "labels", "ceu")
    owner = required(x.token_owner, "token owners", "ceu")
    keep = position_in_sequence(owner) >= skip
    z, y = logits[keep], labels[keep]
    masked = z.detach().clone()
    masked[torch.arange(y.numel(), device=y.device), y] = float("-inf")
    target = F.softmax(masked, dim=-1)
    logq = F.log_softmax(z, dim=-1).masked_fill(target == 0, 0.0)  # 0 x log p at the label, never 0 x -inf
    return -(target * logq).sum()
