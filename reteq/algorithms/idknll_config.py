"""IdkNLL's declaration (its loss: reteq/algorithms/idknll.py).

The averaging is a choice: by default each alternative's token-mean NLL, averaged over the step's sequences (the
behaviour keys were recorded with); `batch_token_mean: 1` takes the token mean over all the step's alternative
tokens, as TOFU's IdK (one cross-entropy over the batch). They differ when the alternatives' lengths differ.
"""

from reteq.algorithms.method import Method, Need, flag

METHOD = Method(
    "idknll",
    label="IdkNLL",
    summary="IdkNLL: minimise the alternative answers' NLL, -log pi(a|x) / |a| per sequence (or the batch's "
            "token mean).",
    formula="`-log pi(a) / \\|a\\|`; `batch_token_mean: 1`: `-log pi(a) / mean \\|a\\|` over the step "
            "(the batch's token mean)",
    source="Maini et al. 2024, arXiv:2401.06121 (TOFU IdK: the batch's token mean, `batch_token_mean: 1`)",
    knobs={"batch_token_mean": flag("0 = mean over sequences of each alternative's token mean; 1 = the step's "
                                    "token mean (TOFU)")},
    needs={Need.ALTERNATIVE},
)
