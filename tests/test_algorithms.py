"""GA, NPO and SimNPO: each loss is its formula (checked by hand with `math`), and each one unlearns.

Formulas (PAPER.md, over summed response log-probs; a loss returns the micro-batch's sum, the mean is taken here):
  GA       log pi
  NPO      -(2/beta) log sigmoid(-beta (log pi - log pi_ref))
  SimNPO   -(2/beta) log sigmoid(-beta log pi)
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import model_cfg, refusal_finetune, reteq_cache  # noqa: F401  (session fixture)

from reteq.algorithms import ALGORITHMS, Need, get_algorithm
from reteq.algorithms.base import LOSSES, MethodInputs, implements
from reteq.algorithms.ga_config import METHOD as GA
from reteq.config import EvalConfig, UnlearnConfig
from reteq.data.forget_targets import UNLEARN_LABEL

LOGP = [-3.0, -1.5, -0.25, -42.0]
REF = [-2.0, -2.5, -0.25, -60.0]


def _softplus(z: float) -> float:
    """log(1 + e^z) without overflow: -log sigmoid(-z)."""
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _loss_and_grad(name: str, logp: list[float], ref: list[float] | None, beta: float | None):
    x = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    r = torch.tensor(ref, dtype=torch.float64) if ref is not None else None
    loss = get_algorithm(name).loss(MethodInputs.of_sequences(x, r), {} if beta is None else {"beta": beta}) / len(x)
    loss.backward()
    return float(loss.detach()), x.grad.tolist()


def test_registry_holds_the_papers_three_methods_with_the_papers_defaults():
    assert {"ga", "npo", "simnpo"} <= set(ALGORITHMS)
    assert ALGORITHMS["npo"].needs == {Need.REF_LOGPS} and not ALGORITHMS["ga"].needs
    assert not ALGORITHMS["ga"].uses_beta and not ALGORITHMS["ga"].needs_reference
    assert ALGORITHMS["npo"].uses_beta and ALGORITHMS["npo"].needs_reference and ALGORITHMS["npo"].default_beta == 0.5
    assert ALGORITHMS["simnpo"].uses_beta and not ALGORITHMS["simnpo"].needs_reference
    assert ALGORITHMS["simnpo"].default_beta == 1.0
    with pytest.raises(ValueError, match="unknown algorithm 'gd'"):
        get_algorithm("gd")
    assert UnlearnConfig().betas_for("ga") == [None]
    assert UnlearnConfig(betas={}).betas_for("npo") == [0.5]


def test_ga_is_the_mean_log_prob():
    loss, grad = _loss_and_grad("ga", LOGP, None, None)
    assert loss == pytest.approx((-3.0 - 1.5 - 0.25 - 42.0) / 4, abs=1e-12)
    assert grad == pytest.approx([0.25] * 4)  # minimising pushes every response's likelihood down equally


@pytest.mark.parametrize("beta", [0.5, 0.1, 2.0])
def test_npo_matches_its_formula(beta):
    loss, grad = _loss_and_grad("npo", LOGP, REF, beta)
    per = [(2 / beta) * _softplus(beta * (lp - rf)) for lp, rf in zip(LOGP, REF)]
    assert loss == pytest.approx(sum(per) / 4, rel=1e-12)
    # d/dlogp of -(2/b) log sig(-b d) = 2 sig(b d): the adaptive weight that bounds NPO's push
    assert grad == pytest.approx([2 * _sigmoid(beta * (lp - rf)) / 4 for lp, rf in zip(LOGP, REF)], rel=1e-12)


def test_npo_at_the_reference_is_2_ln2_over_beta_and_steps_like_ga():
    loss, grad = _loss_and_grad("npo", LOGP, LOGP, 0.5)
    assert loss == pytest.approx(4 * math.log(2), rel=1e-12)
    assert grad == pytest.approx(_loss_and_grad("ga", LOGP, None, None)[1], rel=1e-12)


@pytest.mark.parametrize("beta", [1.0, 0.05, 3.0])
def test_simnpo_matches_its_formula(beta):
    loss, grad = _loss_and_grad("simnpo", LOGP, None, beta)
    per = [(2 / beta) * _softplus(beta * lp) for lp in LOGP]
    assert loss == pytest.approx(sum(per) / 4, rel=1e-12)
    assert grad == pytest.approx([2 * _sigmoid(beta * lp) / 4 for lp in LOGP], rel=1e-12)
    # no reference: the same logp gives the same loss whatever ref is passed
    assert _loss_and_grad("simnpo", LOGP, REF, beta)[0] == loss


def test_losses_stay_finite_far_from_the_reference():
    far = [-5000.0, 0.0]
    for name, ref, beta in [("npo", [0.0, -5000.0], 1.0), ("simnpo", None, 1.0)]:
        loss, grad = _loss_and_grad(name, far, ref, beta)
        assert math.isfinite(loss) and all(math.isfinite(g) for g in grad), name
    loss, _ = _loss_and_grad("npo", far, [0.0, -5000.0], 1.0)
    assert loss == pytest.approx((2 * _softplus(-5000.0) + 2 * _softplus(5000.0)) / 2, rel=1e-12)


@pytest.mark.parametrize("name,ref,beta", [("ga", None, None), ("npo", REF, 0.5), ("simnpo", None, 1.0)])
@pytest.mark.parametrize("normalisation", ["sequence", "token"])
def test_step_loss_normalises_per_sequence_or_per_token(name, ref, beta, normalisation):
    """A global batch of 4 sequences (16 response tokens) in two micro-batches: the micro-batch shares add up
    to sum(per-sequence loss) / 4 (`sequence`) or / 16 (`token`), computed by hand."""
    from reteq.train.loop import Step
    from reteq.train.recipes import normaliser

    tokens = [3, 2, 1, 10]
    step = Step([], label_tokens=sum(tokens), sequences=4)
    per = {"ga": list(LOGP), "npo": [(2 / 0.5) * _softplus(0.5 * (lp - rf)) for lp, rf in zip(LOGP, REF)],
           "simnpo": [2 * _softplus(lp) for lp in LOGP]}[name]
    want = sum(per) / (16 if normalisation == "token" else 4)
    total = 0.0
    for part in (slice(0, 2), slice(2, 4)):
        x = torch.tensor(LOGP[part], dtype=torch.float64)
        r = torch.tensor(ref[part], dtype=torch.float64) if ref is not None else None
        params = {} if beta is None else {"beta": beta}
        total += float(get_algorithm(name).loss(MethodInputs.of_sequences(x, r), params) / normaliser(step, normalisation))
    assert total == pytest.approx(want, rel=1e-12)


def test_authors_normalisation_is_the_default():
    """src/loss.py + src/unlearn_trainer.py: GA token mean; NPO and SimNPO per sequence."""
    cfg = UnlearnConfig()
    assert [cfg.normalisation(a) for a in ("ga", "npo", "simnpo")] == ["token", "sequence", "sequence"]
    assert UnlearnConfig(loss_normalisation={"ga": "sequence"}).normalisation("ga") == "sequence"
    with pytest.raises(ValueError, match="unknown algorithm"):
        UnlearnConfig(loss_normalisation={"gd": "token"})


def test_npo_and_simnpo_need_their_inputs():
    x = MethodInputs.of_sequences(torch.tensor(LOGP))
    with pytest.raises(ValueError, match="reference log-probs"):
        get_algorithm("npo").loss(x, {"beta": 0.5})
    with pytest.raises(ValueError, match="beta"):
        get_algorithm("simnpo").loss(x, {})


# ---- each method unlearns a refusal the tiny model has learned -------------------------------------------------------

@pytest.mark.usefixtures("reteq_cache")
@pytest.mark.parametrize("algorithm,beta", [("ga", None), ("npo", 0.5), ("simnpo", 0.05)])
def test_each_method_lowers_the_unlearn_labels_log_prob(algorithm, beta):
    """SimNPO's beta: the summed log-prob of a refusal is ~ -70 on this model, and the SimNPO gradient weight
    2 sigmoid(beta log pi) is ~1e-30 at beta=1 (below Adam's eps), so beta=0.05 (weight ~0.06) is used."""
    from reteq.eval.evaluator import Evaluator
    from reteq.models import load_model, load_tokenizer
    from reteq.train.recipes import UnlearnJob, unlearn
    from reteq.train.worker_context import WorkerContext

    ft = refusal_finetune()
    mcfg = model_cfg()
    tokenizer = load_tokenizer(mcfg)
    model = load_model(mcfg)
    model.load_state_dict(ft.state)
    # the paper's label (its "you" is where this tiny model's refusal moves most; the default is the authors' one)
    evaluator = Evaluator.build(EvalConfig(metrics=["forget"], forget_prompts=4, unlearn_label=UNLEARN_LABEL),
                                tokenizer, ft.convs, None, None)
    cfg = UnlearnConfig(algorithms=[algorithm], lrs=[1e-3], steps=2, global_batch=8, micro_batch=8, max_length=96,
                        eval_every=1)
    torch.manual_seed(0)
    params = {} if beta is None else {"beta": beta}
    result = unlearn(model, tokenizer, UnlearnJob(cfg, algorithm, 1e-3, params, ft.convs), evaluator, WorkerContext())
    assert not result.collapsed
    assert [s for s, _ in result.evals] == [0, 1, 2]
    before = result.evals[0][1]["forget/label_logp"]
    after = result.evals[-1][1]["forget/label_logp"]
    assert before > -4.0, "the finetuned model should have learned the refusal"
    assert after < before - 0.3, (before, after)
    assert result.evals[-1][1]["forget/score"] > 0  # label + paraphrases fell on average
    if algorithm == "npo":  # the first step starts at the reference: loss (2/beta) ln 2 exactly
        assert result.loop.records[0].loss == pytest.approx(2 / beta * math.log(2), rel=1e-4)


def test_a_second_method_under_a_taken_name_is_an_error():
    """A duplicate name used to replace the first method silently (a sweep would run the wrong loss)."""
    before = get_algorithm("ga")
    with pytest.raises(ValueError, match="'ga' is already implemented by reteq.algorithms.ga"):
        implements(GA)(lambda x, params: x.seq_logp.mean())
    assert LOSSES["ga"] is before
