"""NPO+RT's declaration (its loss: reteq/algorithms/npo_retain.py)."""

from reteq.algorithms.method import Knob, Method, Need, retain_knobs

METHOD = Method(
    "npo_retain",
    label="NPO+RT",
    summary="NPO+RT: NPO's -(2/beta) log sigmoid(-beta (log pi - log pi_ref)) per sequence, plus the loop's "
            "retain NLL.",
    formula="NPO's term + loop's `retain_weight x` retain NLL",
    source="Zhang et al. 2024 (NPO+RT); open-unlearning NPO (alpha = retain_weight)",
    knobs={"beta": Knob(0.5, 0.0, low_open=True, doc="inverse temperature"), **retain_knobs()},
    needs={Need.REF_LOGPS, Need.RETAIN},
)
