"""What the shared unlearning loop hands a method: exactly the inputs it declared (reteq.algorithms.method.Need).

One forward pass per forget micro-batch. Without LOGITS or HIDDEN it is the training path of every other loss
(`batch_token_logps`, which for one packed row projects only the label positions onto the vocabulary); with
them the logits at the response positions are kept, and hidden states are requested from the model. Alternative
answers and retain examples are paired with forget examples by their index and go through a padded batch.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from reteq.algorithms.base import Algorithm, MethodInputs
from reteq.algorithms.method import Need
from reteq.data.packing import is_packed
from reteq.data.tokenize import Example, collate
from reteq.train.logprobs import (
    attention_kwargs,
    batch_token_logps,
    block_causal_mask,
    check_packed_rows,
    label_logps,
)


@dataclass
class TokenView:
    """A batch's response tokens, flat in one order: a sequence's tokens are contiguous (see MethodInputs)."""

    token_logp: torch.Tensor  # (N,)
    owner: torch.Tensor  # (N,) position of the token's sequence in batch.index
    labels: torch.Tensor  # (N,)
    seq_logp: torch.Tensor  # (B,) in batch.index order
    seq_tokens: torch.Tensor  # (B,)
    logits: torch.Tensor | None = None  # (N, V)
    hidden: torch.Tensor | None = None  # (N, H)


def _owners(batch) -> torch.Tensor:
    """(rows, T-1): the position in batch.index of the sample each target token belongs to."""
    target = batch.labels[:, 1:]
    if is_packed(batch):
        return batch.seq_ids[:, 1:]
    return torch.arange(target.size(0), device=target.device)[:, None].expand_as(target)


def token_view(model, batch, *, logits: bool = False, hidden_layer: int | None = None) -> TokenView:
    """The response tokens of a padded or packed batch, with their logits and hidden states when asked."""
    target = batch.labels[:, 1:]
    full_logits = hidden = None
    if not logits and hidden_layer is None:
        logp, mask = batch_token_logps(model, batch)
    else:
        if is_packed(batch):
            check_packed_rows(model, batch)
            kwargs = attention_kwargs(model, batch.position_ids, lambda dt: block_causal_mask(batch.seq_ids, dt))
        else:
            kwargs = {"attention_mask": batch.attention_mask}
        out = model(input_ids=batch.input_ids, output_hidden_states=hidden_layer is not None, **kwargs)
        full_logits = out.logits[:, :-1].float()
        logp, mask = label_logps(full_logits, target)
        if hidden_layer is not None:
            layers = len(out.hidden_states) - 1
            if not 0 <= hidden_layer <= layers:
                raise ValueError(f"layer {hidden_layer} is outside the model's 0..{layers}")
            hidden = out.hidden_states[hidden_layer][:, 1:][mask].float()  # at the response tokens themselves
    owner = _owners(batch)[mask]
    n = int(batch.index.numel())
    flat = logp[mask]
    seq_logp = torch.zeros(n, dtype=flat.dtype, device=flat.device).index_add(0, owner, flat)
    seq_tokens = torch.zeros(n, dtype=torch.long, device=flat.device).index_add(0, owner, torch.ones_like(owner))
    return TokenView(flat, owner, target[mask], seq_logp, seq_tokens,
                     full_logits[mask] if logits else None, hidden)


def paired_batch(examples: Mapping[int, Example] | list[Example], index: torch.Tensor, pad_id: int):
    """A padded batch of the examples paired with `index` (forget positions), in the same order."""
    return collate([examples[int(i)] for i in index.tolist()], pad_id)


class Pairing:
    """Each forget example's retain partner: a seeded permutation of the retain set, cycled, so the retain term
    sees as many retain sequences as the step has forget sequences and a leaf's seed fixes which."""

    def __init__(self, retain: list[Example], seed: int):
        order = list(range(len(retain)))
        random.Random(seed).shuffle(order)
        self.retain, self.order = retain, order

    def __getitem__(self, forget_index: int) -> Example:
        return self.retain[self.order[forget_index % len(self.order)]]


def mean_tokens(examples: Mapping[int, Example] | list[Example] | Pairing, index: Sequence[int]) -> float:
    """The mean response length of the examples paired with a step's forget indices (all workers): the
    per-sequence divisor that makes a sum over sequences, divided by the step's sequences, a token mean."""
    return sum(examples[i].n_label_tokens for i in index) / max(len(index), 1)


def retain_nll(model, pairing: Pairing, index: torch.Tensor, pad_id: int, device,
               step_mean_tokens: float | None = None) -> torch.Tensor:
    """The micro-batch's retain NLL, summed over its retain partners: each partner's token mean (-log pi(r) / |r|,
    retain_token_mean 0), or its summed NLL over `step_mean_tokens`, the step's mean retain length (1: divided by
    the step's sequences, the token mean over all the step's retain tokens, open-unlearning's)."""
    view = token_view(model, paired_batch(pairing, index, pad_id).to(device))
    if step_mean_tokens is not None:
        return -view.seq_logp.sum() / step_mean_tokens
    return (-view.seq_logp / view.seq_tokens.clamp_min(1)).sum()


# params: the model and micro-batch, then the method, its knobs, and the cached/paired inputs it may need
def gather(model, batch, alg: Algorithm, params: Mapping[str, float], reference=None,
           alternatives: list[Example] | None = None, pad_id: int = 0) -> MethodInputs:
    """MethodInputs for one forget micro-batch: what `alg` declared and nothing more."""
    needs = alg.needs
    layer = int(params["layer"]) if Need.HIDDEN in needs else None
    view = token_view(model, batch, logits=bool(needs & {Need.LOGITS, Need.REF_LOGITS}), hidden_layer=layer)
    x = MethodInputs(view.seq_logp, view.seq_tokens)
    if needs & {Need.TOKEN_LOGPS, Need.LOGITS, Need.REF_LOGITS, Need.HIDDEN}:
        x.token_logp, x.token_owner, x.labels = view.token_logp, view.owner, view.labels
    if Need.LOGITS in needs:
        x.logits = view.logits
    if Need.HIDDEN in needs:
        x.hidden = view.hidden
    index = batch.index.cpu()
    if Need.REF_LOGPS in needs:
        x.ref_seq_logp = reference.seq_logp[index].to(view.seq_logp)
    if Need.REF_LOGITS in needs:
        x.ref_logits = reference.logits_for(index, view.owner.cpu()).to(view.seq_logp.device)
    if Need.ALTERNATIVE in needs:
        alt = token_view(model, paired_batch(alternatives, index, pad_id).to(batch.input_ids.device))
        x.alt_seq_logp, x.alt_seq_tokens = alt.seq_logp, alt.seq_tokens
        if Need.REF_LOGPS in needs:
            x.ref_alt_seq_logp = reference.alt_seq_logp[index].to(alt.seq_logp)
    return x
