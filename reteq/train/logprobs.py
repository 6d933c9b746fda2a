"""Log-probabilities of labelled tokens: the quantity every loss and every likelihood metric is built from.

Two batch forms, one meaning. A padded `reteq.data.tokenize.Batch` runs with its 2D attention mask; a packed
`reteq.data.packing.PackedBatch` runs several samples per row with attention confined to each sample (a
block-diagonal causal 4D mask for sdpa/eager, position_ids alone for flash-attention's varlen path). Either
way `sequence_logps` returns one summed response log-prob per sample, in the order of `batch.index`.

Import-light on purpose (torch only): bench/ runs these functions on GPU machines without pydantic.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from reteq.data.packing import IGNORE, PackedBatch, attn_implementation, is_packed

if TYPE_CHECKING:
    from reteq.data.tokenize import Batch


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label_t | prefix), mask) for every position t >= 1, shapes (B, T-1); IGNORE labels masked."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    logits = model(**kwargs).logits[:, :-1].float()
    return label_logps(logits, labels[:, 1:])


def label_logps(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = target != IGNORE
    logp = -F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.clamp_min(0).reshape(-1),
                            reduction="none").view_as(target)
    return logp.masked_fill(~mask, 0.0), mask  # masked_fill, not *: a non-finite pad logit must not leak


# ---- packed batches -------------------------------------------------------------------------------------------

def block_causal_mask(seq_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(R, 1, T, T) mask: query q sees key k iff same sample and k at or before q. Padding sees itself.

    bool (True = attend) for sdpa; with `dtype` an additive float mask (0 / dtype min) for eager attention.
    """
    same = seq_ids[:, :, None] == seq_ids[:, None, :]  # padding (-1) sees padding: no all-masked query rows
    idx = torch.arange(seq_ids.size(1), device=seq_ids.device)
    allowed = (same & (idx[None, :] <= idx[:, None]))[:, None]  # a sample's tokens are contiguous in its row
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                       torch.finfo(dtype).min)


def attention_kwargs(model, position_ids: torch.Tensor, mask_fn) -> dict:
    """Forward kwargs that confine attention as `mask_fn(dtype)` says, for the model's attention kernel.

    sdpa: a bool 4D mask. eager: an additive float 4D mask. flash-attention (varlen, batch size 1) and others
    (e.g. flex_attention): position_ids alone with no attention mask, from which transformers derives the
    sample boundaries itself (only valid for plain packing, where positions restart at each sample).
    """
    impl = attn_implementation(model)
    kwargs: dict = {"position_ids": position_ids, "use_cache": False}  # no cache: transformers packs only without
    if impl == "sdpa":
        kwargs["attention_mask"] = mask_fn(None)
    elif impl == "eager":
        kwargs["attention_mask"] = mask_fn(torch.float32)
    else:
        kwargs["attention_mask"] = None
    return kwargs


def _unwrap(model):
    """The transformers model under DeepSpeed (.module) and peft (.get_base_model()) wrappers."""
    m = getattr(model, "module", model)
    get_base = getattr(m, "get_base_model", None)
    return get_base() if callable(get_base) else m


@functools.lru_cache(maxsize=64)
def _class_accepts_logits_to_keep(cls) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def accepts_logits_to_keep(model) -> bool:
    return _class_accepts_logits_to_keep(type(_unwrap(model)))


def check_packed_rows(model, batch: PackedBatch) -> None:
    """transformers' flash-attention path finds sample boundaries from position_ids only at batch size 1; with
    more rows it would silently attend across samples."""
    if batch.input_ids.size(0) != 1 and (batch.layout == "varlen" or "flash" in attn_implementation(model)):
        raise ValueError("flash-attention needs packed batches as a single row (layout 'varlen')")


def packed_token_logps(model, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label_t | same-sample prefix), mask), shapes (R, T-1), for a packed batch."""
    check_packed_rows(model, batch)
    kwargs = attention_kwargs(model, batch.position_ids,
                              lambda dt: block_causal_mask(batch.seq_ids, dt))
    target = batch.labels[:, 1:]
    if batch.input_ids.size(0) == 1 and accepts_logits_to_keep(model):
        # one row: project only the positions that predict a label onto the (huge) vocabulary
        keep = (target[0] != IGNORE).nonzero().squeeze(-1)
        logits = model(input_ids=batch.input_ids, logits_to_keep=keep, **kwargs).logits.float()
        logp, mask = label_logps(logits, target[:, keep])
        full = torch.zeros(target.shape, dtype=logp.dtype, device=logp.device)
        full[0, keep] = logp[0]
        return full, target != IGNORE
    logits = model(input_ids=batch.input_ids, **kwargs).logits[:, :-1].float()
    return label_logps(logits, target)


# ---- either form ----------------------------------------------------------------------------------------------

def batch_token_logps(model, batch: Batch | PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (log-prob, mask) of a padded or a packed batch; .sum() of either is the batch's total."""
    if is_packed(batch):
        return packed_token_logps(model, batch)
    return token_logps(model, batch.input_ids, batch.attention_mask, batch.labels)


def sequence_logps(model, batch: Batch | PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-prob per sequence and the number of response tokens, shapes (B,) in index order."""
    if not is_packed(batch):
        logp, mask = token_logps(model, batch.input_ids, batch.attention_mask, batch.labels)
        return logp.sum(-1), mask.sum(-1)
    logp, mask = packed_token_logps(model, batch)
    seg = batch.seq_ids[:, 1:][mask]  # the sample each labelled token belongs to (targets are never padding)
    n = batch.n_sequences
    sums = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, seg, logp[mask])
    counts = torch.zeros(n, dtype=torch.long, device=logp.device).index_add(0, seg, torch.ones_like(seg))
    return sums, counts
