"""Log-probabilities of labelled tokens: the quantity every loss and every likelihood metric is built from."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reteq.data.tokenize import IGNORE, Batch


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label_t | prefix), mask) for every position t >= 1, shapes (B, T-1); IGNORE labels masked."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    logits = model(**kwargs).logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE
    logp = -F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.clamp_min(0).reshape(-1),
                            reduction="none").view_as(target)
    return logp * mask, mask


def sequence_logps(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-prob per sequence and the number of response tokens, shapes (B,)."""
    logp, mask = token_logps(model, batch.input_ids, batch.attention_mask, batch.labels)
    return logp.sum(-1), mask.sum(-1)
