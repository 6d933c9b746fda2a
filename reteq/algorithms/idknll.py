"""IdkNLL (Maini et al., 2024, TOFU's "IdK"): learn an "I don't know" answer to each forget prompt instead.

    loss = sum_i  -log pi(a_i | x_i) / |a_i|

a_i: prompt i's alternative answer (reteq.data.alternatives, generated; TOFU ships idontknow.jsonl). Per sequence,
the token-mean NLL of the alternative; the loop divides by the global batch's sequences. It lowers the forget
responses only indirectly, by the probability mass the alternatives take.
"""

from collections.abc import Mapping

import torch

from reteq.algorithms.base import MethodInputs, Need, register, required


@register("idknll", label="IdkNLL", needs={Need.ALTERNATIVE},
          source="Maini et al. 2024, arXiv:2401.06121 (TOFU, IdK); open-unlearning IdkNLL (GradDiff on idk data)")
def idknll(x: MethodInputs, params: Mapping[str, float]) -> torch.Tensor:
    """IdkNLL: minimise each alternative answer's token-mean NLL, -log pi(a|x) / |a|, per sequence."""
    alt = required(x.alt_seq_logp, "alternative log-probs", "idknll")
    tokens = required(x.alt_seq_tokens, "alternative token counts", "idknll")
    return (-alt / tokens.clamp_min(1).to(alt)).sum()
