"""Batched likelihood scoring: mean per-token log-prob of a target response given a chat-formatted prompt.

Pairs are sorted by length before batching so each batch pads little; results come back in input order.
"""

from __future__ import annotations

import torch

from reteq.data.tokenize import IGNORE
from reteq.train.logprobs import token_logps
from reteq.train.precision import autocast


@torch.no_grad()
def score_pairs(model, pairs: list[tuple[list[int], list[int]]], *, pad_id: int, batch_size: int = 32,
                device: torch.device | None = None, dtype: str = "fp32") -> list[float]:
    """Mean per-token log p(target | prompt) for each (prompt_ids, target_ids) pair."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out = [0.0] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(pairs[i][0]) + len(pairs[i][1]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            p, t = pairs[i]
            ids[r, : len(p) + len(t)] = torch.tensor(p + t)
            labels[r, len(p): len(p) + len(t)] = torch.tensor(t)
            mask[r, : len(p) + len(t)] = 1
        with autocast(dtype, device):
            logp, m = token_logps(model, ids.to(device), mask.to(device), labels.to(device))
        means = (logp.sum(-1) / m.sum(-1).clamp_min(1)).tolist()
        for r, i in enumerate(chunk):
            out[i] = means[r]
    model.train(was_training)
    return out
