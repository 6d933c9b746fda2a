"""GA's declaration (its loss: reteq/algorithms/ga.py)."""

from reteq.algorithms.method import Method

METHOD = Method(
    "ga",
    summary="GA: minimise log pi(y|x), summed over the response (the authors normalise per response token).",
    formula="`log pi(y)`",
    source="the paper; authors' NegCE; open-unlearning GradAscent",
    normalisation="token",
)
