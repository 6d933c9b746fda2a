"""NPO's declaration (its loss: reteq/algorithms/npo.py)."""

from reteq.algorithms.method import Knob, Method, Need

METHOD = Method(
    "npo",
    summary="NPO: minimise -(2/beta) log sigmoid(-beta (log pi - log pi_ref)) per sequence.",
    formula="`-(2/beta) log sigmoid(-beta (log pi(y) - log pi_ref(y)))`",
    source="Zhang et al. 2024, arXiv:2404.05868; open-unlearning NPO; the paper's beta",
    knobs={"beta": Knob(0.5, 0.0, low_open=True, doc="inverse temperature (the paper's 0.5)")},
    needs={Need.REF_LOGPS},
)
