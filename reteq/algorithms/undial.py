"""UNDIAL (Dong et al., 2024): self-distillation towards the start checkpoint with the label's logit lowered.

    loss = sum_t  CE(z_t, softmax(z_ref,t - strength * onehot(y_t)))
         = sum_t  - sum_v q_t,v log softmax(z_t)_v

z_t: the model's logits that predict response token y_t; z_ref,t: the start checkpoint's (reteq.train.reference,
computed once per leaf where open-unlearning runs the teacher every step). The target keeps pi_ref's distribution
over every other token and only demotes the one to forget, so the push is bounded (the loss is minimal at the
target). `strength` is open-unlearning's `beta` (10.0). Summed over response tokens; the loop divides by the
global batch's response tokens. open-unlearning's compute_undial_loss divides by every position of the batch,
prompt and padding included, so its divisor is not the response-token count (docs/methods.md).
"""

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from reteq.algorithms.base import MethodInputs, implements, knob, required
from reteq.algorithms.undial_config import METHOD


def undial_target(ref_logits: torch.Tensor, labels: torch.Tensor, strength: float) -> torch.Tensor:
    """(N, V) soft labels: softmax of the reference logits with each label's logit lowered by `strength`."""
    adjusted = ref_logits.clone()
    adjusted[torch.arange(labels.numel(), device=labels.device), labels] -= strength
    return F.softmax(adjusted, dim=-1)


@implements(METHOD)
def undial(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """UNDIAL: minimise sum_t CE(z_t, softmax(z_ref,t - strength onehot(y_t))) over response tokens."""
    strength = knob(params, "strength", "undial")
    logits = required(x.logits, "logits", "undial")
    ref = required(x.ref_logits, "reference logits", "undial").to(logits)
    labels = required(x.labels, "labels", "undial")
    target = undial_target(ref.detach(), labels, strength)
    return -(target * F.log_softmax(logits, dim=-1)).sum()
