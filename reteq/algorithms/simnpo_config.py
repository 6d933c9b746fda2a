"""SimNPO's declaration (its loss: reteq/algorithms/simnpo.py).

By default the reproduced paper's variant (Yu et al. 2025, the authors' code): NPO's loss with log pi_ref = 0 on
the response's SUMMED log-prob. Fan et al.'s SimNPO divides it by the response length (`length_norm: 1`; they
also add a margin gamma, 0 in several of their settings, and use beta 2.5 on TOFU): tune beta per form.
"""

from reteq.algorithms.method import Knob, Method, flag

METHOD = Method(
    "simnpo",
    summary="SimNPO: minimise -(2/beta) log sigmoid(-beta log pi(y)) per sequence (Fan et al.: log pi(y) / |y|).",
    formula="`-(2/beta) log sigmoid(-beta log pi(y))`; `length_norm: 1`: `log pi(y) / \\|y\\|`",
    source="the paper's variant (summed log-prob, the authors' code); Fan et al. 2024, arXiv:2410.07163 is "
           "length-normalised (`length_norm: 1`)",
    knobs={"beta": Knob(1.0, 0.0, low_open=True, doc="inverse temperature"),
           "length_norm": flag("0 = summed log-prob (the reproduced paper); 1 = divided by the response's "
                               "tokens (Fan et al.)")},
)
