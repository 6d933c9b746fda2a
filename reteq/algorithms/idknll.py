"""IdkNLL (Maini et al., 2024, TOFU's "IdK"): learn an "I don't know" answer to each forget prompt instead.

    loss = sum_i  -log pi(a_i | x_i) / |a_i|        (batch_token_mean 0, the default)
    loss = sum_i  -log pi(a_i | x_i) / mean_j |a_j|  (batch_token_mean 1; mean over the step's alternatives)

a_i: prompt i's alternative answer (reteq.data.alternatives, generated; TOFU ships idontknow.jsonl). Per sequence;
the loop divides by the global batch's sequences. The default averages each alternative's token-mean NLL over the
sequences; TOFU's IdK (its data module and Trainer: the model's `outputs.loss`) takes the token mean over the
batch's alternative tokens, which `batch_token_mean: 1` gives exactly (divided by B, sum_i NLL_i / (B mean |a|)
is sum_i NLL_i over the step's alternative tokens). The two differ when the alternatives' lengths differ: the
default weighs every sequence alike, the token mean weighs long alternatives more. It lowers the forget responses
only indirectly, by the probability mass the alternatives take.
"""

from collections.abc import Mapping

import torch

from reteq.algorithms.base import MethodInputs, implements, required
from reteq.algorithms.idknll_config import METHOD


@implements(METHOD)
def idknll(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """IdkNLL: minimise each alternative answer's NLL over its length, -log pi(a|x) / |a|, per sequence."""
    alt = required(x.alt_seq_logp, "alternative log-probs", "idknll")
    if params.get("batch_token_mean", 0):  # TOFU: the token mean over the whole step's alternatives
        mean = required(x.alt_mean_tokens, "the step's mean alternative length", "idknll")
        return (-alt).sum() / mean
    tokens = required(x.alt_seq_tokens, "alternative token counts", "idknll")
    return (-alt / tokens.clamp_min(1).to(alt)).sum()
