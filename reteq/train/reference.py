"""Reference quantities on the fixed forget set: computed once from a leaf's start checkpoint, then looked up.

NPO and IdkDPO compare against pi_ref, UNDIAL distils from pi_ref's logits. The forget set and the start
checkpoint do not change during unlearning, so one no-grad pass before the first step gives every value a step
will ask for (open-unlearning keeps a reference model and runs it every step). Leaves that start from the same
checkpoint in the same warm worker share the pass: the last reference is kept in-process under its key (the
parent node key, the examples' tokens, what was computed, the precision).

Memory: summed log-probs are one float per example; logits are (response tokens x vocabulary) floats per
example, kept on the CPU: 48 forget rows x ~12 response tokens x 49,152 (SmolLM2) x 4 B = ~110 MB.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from reteq.algorithms.base import Algorithm
from reteq.algorithms.method import Need
from reteq.data.packing import layout_for, pack
from reteq.data.tokenize import Example, collate
from reteq.train.logprobs import sequence_logps
from reteq.train.method_inputs import token_view
from reteq.train.precision import autocast


@dataclass
class Reference:
    seq_logp: torch.Tensor  # (n,) float64, by example index
    logits: dict[int, torch.Tensor] | None = None  # example index -> (its response tokens, V) on the CPU
    alt_seq_logp: torch.Tensor | None = None  # (n,) the alternative answers'

    def logits_for(self, index: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """The cached logits of a micro-batch's response tokens, in the order `owner` lists them."""
        runs = torch.unique_consecutive(owner)
        out = torch.cat([self.logits[int(index[o])] for o in runs.tolist()])
        if out.size(0) != owner.numel():
            raise RuntimeError(f"reference logits cover {out.size(0)} tokens, the batch has {owner.numel()}")
        return out


@dataclass(frozen=True)
class Batching:
    """How a reference pass builds its micro-batches: `micro` examples each, padded with `pad_id`, on `device`,
    packed or not, under the precision policy `dtype` (the same as the training steps)."""

    micro: int
    pad_id: int
    device: Any
    packing: bool = False
    dtype: str = "fp32"


_LAST: tuple[str, Reference] | None = None  # the in-process cache: the last reference computed, by its key


def _key(start: str, examples: list[Example], alternatives: list[Example] | None, needs, dtype: str,
         packing: bool) -> str:
    h = hashlib.sha256(f"{start}|{sorted(n.value for n in needs)}|{dtype}|{packing}".encode())
    for e in [*examples, *(alternatives or [])]:
        h.update(repr((e.index, e.input_ids, e.labels)).encode())
    return h.hexdigest()


@torch.no_grad()
def compute_reference(model, alg: Algorithm, examples: list[Example], alternatives: list[Example] | None,
                      batching: Batching, start: str | None = None) -> Reference | None:
    """Everything `alg` reads from the start checkpoint, or None when it reads nothing. The model and the data,
    then how batches are built, then the start checkpoint's key (None: no sharing across leaves)."""
    global _LAST
    micro, pad_id, device, packing, dtype = (batching.micro, batching.pad_id, batching.device, batching.packing,
                                             batching.dtype)
    needs = alg.needs & {Need.REF_LOGPS, Need.REF_LOGITS}
    if not needs:
        return None
    key = _key(start, examples, alternatives, needs, dtype, packing) if start else None
    if key is not None and _LAST is not None and _LAST[0] == key:
        return _LAST[1]
    was = model.training
    model.eval()
    ref = Reference(reference_logps(model, examples, micro, pad_id, device, packing, dtype))
    if Need.REF_LOGITS in needs:
        ref.logits = {}
        for s in range(0, len(examples), micro):
            chunk = examples[s:s + micro]
            with autocast(dtype, device):
                view = token_view(model, collate(chunk, pad_id).to(device), logits=True)
            for pos, e in enumerate(chunk):
                ref.logits[e.index] = view.logits[view.owner == pos].cpu()
    if Need.REF_LOGPS in needs and Need.ALTERNATIVE in alg.needs:
        ref.alt_seq_logp = reference_logps(model, alternatives, micro, pad_id, device, False, dtype)
    model.train(was)
    if key is not None:
        _LAST = (key, ref)
    return ref


@torch.no_grad()
def reference_logps(model, examples: list[Example], micro: int, pad_id: int, device,
                    packing: bool = False, dtype: str = "fp32") -> torch.Tensor:
    """Summed response log-prob of every example under the model as it is (NPO's pi_ref), by example index."""
    out = torch.zeros(max(e.index for e in examples) + 1, dtype=torch.float64)
    for s in range(0, len(examples), micro):
        chunk = examples[s:s + micro]
        # [packing hook] the reference goes through the same path as the training steps
        batch = (pack(chunk, pad_id, layout=layout_for(model)) if packing else collate(chunk, pad_id)).to(device)
        with autocast(dtype, device):  # [precision hook] pi_ref under the same policy as the steps
            logp, _ = sequence_logps(model, batch)
        out[[e.index for e in chunk]] = logp.double().cpu()
    return out
