"""Batched likelihood scoring: mean per-token log-prob of a target response given a chat-formatted prompt.

Two paths, one meaning (results come back in input order either way):
  shared  (the default where the attention takes a 4D mask: sdpa, eager) every distinct prompt is encoded once
          and all its targets are scored in the same forward by tree attention (`reteq.eval.prefix_scoring`):
          the forget score's 20 targets per question cost ~1/6 of the tokens, and one-target pairs (TOFU
          answers) are packed into rows instead of padded (~30% padding on a 64-pair batch).
  padded  one padded row per pair, pairs sorted by length so each batch pads little (any attention kernel).
"""

from __future__ import annotations

import torch

from reteq.data.packing import IGNORE
from reteq.eval.prefix_scoring import score_pairs_shared, supports_tree_attention
from reteq.train.logprobs import token_logps
from reteq.train.precision import autocast

METHODS = ("auto", "shared", "padded")


def score_pairs(model, pairs: list[tuple[list[int], list[int]]], *, pad_id: int, batch_size: int = 32,
                device: torch.device | None = None, dtype: str = "fp32", method: str = "auto") -> list[float]:
    """Mean per-token log p(target | prompt) for each (prompt_ids, target_ids) pair.

    method "auto": the shared path when the model's attention takes a custom 4D mask (sdpa, eager), else padded.
    """
    if method not in METHODS:
        raise ValueError(f"unknown scoring method {method!r} (known: {', '.join(METHODS)})")
    kw = dict(pad_id=pad_id, batch_size=batch_size, device=device, dtype=dtype)
    if method == "shared" or (method == "auto" and supports_tree_attention(model)):
        return score_pairs_shared(model, pairs, **kw)
    return score_pairs_padded(model, pairs, **kw)


@torch.no_grad()
def score_pairs_padded(model, pairs: list[tuple[list[int], list[int]]], *, pad_id: int, batch_size: int = 32,
                       device: torch.device | None = None, dtype: str = "fp32") -> list[float]:
    """Mean per-token log p(target | prompt) for each pair, one padded row per pair (the reference path)."""
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
