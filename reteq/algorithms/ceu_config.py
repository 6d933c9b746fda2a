"""CE-U's declaration (its loss: reteq/algorithms/ceu.py)."""

from reteq.algorithms.method import Knob, Method, Need

METHOD = Method(
    "ceu",
    label="CE-U",
    summary="CE-U: minimise sum_t CE(z_t, softmax(stopgrad(z_t) with the label at -inf)) past ignore_first tokens.",
    formula="`CE(z_t, softmax(stopgrad(z_t), z_t[y_t] = -inf))`, each sequence's first `ignore_first` tokens "
            "skipped",
    source="Yang 2025, arXiv:2503.01224; open-unlearning CEU (ignore_first_n_answer_tokens 1)",
    knobs={"ignore_first": Knob(1, 0, doc="response tokens left out at the start of each sequence")},
    needs={Need.LOGITS},
    normalisation="token",
)
