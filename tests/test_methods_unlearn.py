"""Every method beyond the paper's three unlearns on the tiny model through the shared loop
(reteq.train.recipes.unlearn), and the loop adds the retain term of those that have one."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import model_cfg, refusal_finetune, reteq_cache  # noqa: F401  (session fixture)

from reteq.algorithms import ALGORITHMS, RETAIN_WEIGHT
from reteq.algorithms.rmu import control_vector

# ---- every method unlearns through the shared loop on the tiny model -------------------------------------------------

STEPS, LR = 2, 1e-3


def _forget_logp(model, tokenizer, convs) -> float:
    """Mean summed response log-prob of the forget set (padded, no packing)."""
    from reteq.data.tokenize import encode_dataset
    from reteq.train.reference import reference_logps

    examples = encode_dataset(tokenizer, convs, 96)
    return float(reference_logps(model, examples, 32, tokenizer.pad_token_id, torch.device("cpu")).mean())


def _rmu_distance(model, tokenizer, convs, layer: int, coeff: float) -> float:
    """Mean over response tokens of mean_h (h_t - coeff u)^2 at `layer`: RMU's loss per token."""
    from reteq.data.tokenize import collate, encode_dataset
    from reteq.train.method_inputs import token_view

    batch = collate(encode_dataset(tokenizer, convs, 96), tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = token_view(model, batch, hidden_layer=layer).hidden
    return float((hidden - control_vector(hidden.size(-1), coeff, hidden)).pow(2).mean())


def _run(algorithm: str, params: dict, retain: list[dict] | None = None):
    from reteq.config import EvalConfig, UnlearnConfig
    from reteq.eval.evaluator import Evaluator
    from reteq.models import load_model, load_tokenizer
    from reteq.train.recipes import UnlearnJob, WorkerContext, unlearn

    ft = refusal_finetune()
    mcfg = model_cfg()
    tokenizer = load_tokenizer(mcfg)
    model = load_model(mcfg)
    model.load_state_dict(ft.state)
    evaluator = Evaluator.build(EvalConfig(metrics=["forget"], forget_prompts=1), tokenizer, ft.convs, None, None)
    cfg = UnlearnConfig(algorithms=[algorithm], lrs=[LR], steps=STEPS, global_batch=8, micro_batch=8,
                        max_length=96, eval_every=STEPS)
    before = {"logp": _forget_logp(model, tokenizer, ft.convs)}
    if algorithm == "rmu":
        before["rmu"] = _rmu_distance(model, tokenizer, ft.convs, params["layer"], params["coeff"])
    torch.manual_seed(0)
    job = UnlearnJob(cfg, algorithm, LR, params, ft.convs, retain=retain, start=f"test-methods-{algorithm}")
    result = unlearn(model, tokenizer, job, evaluator, WorkerContext())
    after = {"logp": _forget_logp(model, tokenizer, ft.convs)}
    if algorithm == "rmu":
        after["rmu"] = _rmu_distance(model, tokenizer, ft.convs, params["layer"], params["coeff"])
    return result, before, after, tokenizer, model


NEW = ["wga", "satimp", "undial", "ceu", "me", "idknll", "idkdpo", "rmu", "graddiff", "npo_retain"]


@pytest.mark.usefixtures("reteq_cache")
@pytest.mark.parametrize("algorithm", NEW)
def test_each_method_unlearns_the_forget_responses(algorithm):
    params = dict(ALGORITHMS[algorithm].defaults)
    result, before, after, _, _ = _run(algorithm, params)
    assert not result.collapsed
    assert len(result.loop.records) == STEPS
    assert all(math.isfinite(r.loss) for r in result.loop.records)
    if algorithm == "rmu":
        assert after["rmu"] < 0.95 * before["rmu"], (before, after)  # the states moved toward coeff x u
    assert after["logp"] < before["logp"] - 0.5, (before, after)


@pytest.mark.usefixtures("reteq_cache")
@pytest.mark.parametrize("algorithm", ["graddiff", "npo_retain", "rmu"])
def test_the_retain_term_is_added_by_the_loop(algorithm):
    """retain_weight > 0 adds retain_weight x the step's retain partners' token-mean NLL / sequences to the first
    step's loss (same start, same forget batch); at 0 nothing is added and no retain set is needed."""
    from reteq.data.synthetic import knowledge
    from reteq.data.tokenize import encode_dataset, plan_steps
    from reteq.models import load_model, load_tokenizer
    from reteq.train.method_inputs import Pairing, retain_nll

    weight = 2.0
    retain = knowledge(16, seed=0)
    params = dict(ALGORITHMS[algorithm].defaults)
    base, _, _, _, _ = _run(algorithm, params)
    weighted, _, _, tokenizer, _ = _run(algorithm, {**params, RETAIN_WEIGHT: weight}, retain)
    assert not weighted.collapsed
    # the retain partners of the first step's forget examples, under the start checkpoint
    model = load_model(model_cfg())
    model.load_state_dict(refusal_finetune().state)
    model.eval()
    first = plan_steps(len(refusal_finetune().convs), 1.0, 8, 0, STEPS)[0]
    pairing = Pairing(encode_dataset(load_tokenizer(model_cfg()), retain, 96), seed=0)
    with torch.no_grad():
        nll = float(retain_nll(model, pairing, torch.tensor(first), tokenizer.pad_token_id, torch.device("cpu")))
    added = weighted.loop.records[0].loss - base.loop.records[0].loss
    assert nll > 0
    assert added == pytest.approx(weight * nll / 8, rel=1e-3), (added, nll)
    with pytest.raises(ValueError, match="no retain set"):
        _run(algorithm, {**params, RETAIN_WEIGHT: weight})
