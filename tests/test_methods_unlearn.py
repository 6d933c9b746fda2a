"""Every method beyond the paper's three unlearns on the tiny model through the shared loop
(reteq.train.recipes.unlearn), and the loop adds the retain term of those that have one."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import model_cfg, refusal_finetune, reteq_cache  # noqa: F401  (session fixture)

from reteq.algorithms import ALGORITHMS, RETAIN_TOKEN_MEAN, RETAIN_WEIGHT
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


def _run(algorithm: str, params: dict, retain: list[dict] | None = None, micro: int = 8):
    from reteq.config import EvalConfig, UnlearnConfig
    from reteq.eval.evaluator import Evaluator
    from reteq.models import load_model, load_tokenizer
    from reteq.train.recipes import UnlearnJob, unlearn
    from reteq.train.worker_context import WorkerContext

    ft = refusal_finetune()
    mcfg = model_cfg()
    tokenizer = load_tokenizer(mcfg)
    model = load_model(mcfg)
    model.load_state_dict(ft.state)
    evaluator = Evaluator.build(EvalConfig(metrics=["forget"], forget_prompts=1), tokenizer, ft.convs, None, None)
    cfg = UnlearnConfig(algorithms=[algorithm], lrs=[LR], steps=STEPS, global_batch=8, micro_batch=micro,
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


def _token_mean_nll(convs: list[dict], index: list[int]) -> tuple[float, float]:
    """Under the start checkpoint, the conversations paired with a step's forget indices: (the token mean of
    their NLL over all their response tokens, the mean over sequences of each one's token mean)."""
    from reteq.data.tokenize import collate, encode_dataset
    from reteq.models import load_model, load_tokenizer
    from reteq.train.method_inputs import token_view

    tokenizer = load_tokenizer(model_cfg())
    model = load_model(model_cfg())
    model.load_state_dict(refusal_finetune().state)
    model.eval()
    examples = encode_dataset(tokenizer, convs, 96)
    with torch.no_grad():
        view = token_view(model, collate([examples[i] for i in index], tokenizer.pad_token_id))
    nll = -view.seq_logp.double()
    return float(nll.sum() / view.seq_tokens.sum()), float((nll / view.seq_tokens).mean())


@pytest.mark.usefixtures("reteq_cache")
def test_retain_token_mean_is_the_steps_token_mean_over_micro_batches():
    """retain_token_mean 1 adds weight x the token mean over all the step's retain tokens (open-unlearning's), in
    2 accumulated micro-batches exactly as in one; 0 (the default) the mean of per-sequence token means."""
    from reteq.data.synthetic import knowledge
    from reteq.data.tokenize import plan_steps

    weight, retain = 1.5, knowledge(16, seed=0)
    first = plan_steps(len(refusal_finetune().convs), 1.0, 8, 0, STEPS)[0]
    partners = [retain[i] for i in _partner_order(retain, first)]
    token_mean, sequence_mean = _token_mean_nll(partners, list(range(8)))
    assert abs(token_mean - sequence_mean) > 5e-4 * token_mean  # the lengths differ: the choice matters
    base, _, _, _, _ = _run("graddiff", {RETAIN_WEIGHT: 0.0}, micro=4)
    for choice, want in ((1, token_mean), (0, sequence_mean)):
        run, _, _, _, _ = _run("graddiff", {RETAIN_WEIGHT: weight, RETAIN_TOKEN_MEAN: choice}, retain, micro=4)
        added = run.loop.records[0].loss - base.loop.records[0].loss
        assert added == pytest.approx(weight * want, rel=1e-4), (choice, added, want)


def _partner_order(retain: list[dict], index: list[int]) -> list[int]:
    """The retain rows the loop pairs with these forget indices (reteq.train.method_inputs.Pairing, seed 0)."""
    from reteq.train.method_inputs import Pairing

    pairing = Pairing(list(range(len(retain))), seed=0)
    return [pairing[i] for i in index]


@pytest.mark.usefixtures("reteq_cache")
def test_idknll_batch_token_mean_is_the_steps_token_mean_over_micro_batches():
    """batch_token_mean 1: the first step's loss is the token mean of the alternatives' NLL over the whole step
    (TOFU's IdK), accumulated over 2 micro-batches; 0: the mean of per-sequence token means."""
    from reteq.data.alternatives import idk_conversations
    from reteq.data.tokenize import plan_steps

    convs = refusal_finetune().convs
    first = plan_steps(len(convs), 1.0, 8, 0, STEPS)[0]
    token_mean, sequence_mean = _token_mean_nll(idk_conversations(convs), first)
    assert abs(token_mean - sequence_mean) > 5e-4 * token_mean
    for choice, want in ((1, token_mean), (0, sequence_mean)):
        run, _, _, _, _ = _run("idknll", {"batch_token_mean": choice}, micro=4)
        assert run.loop.records[0].loss == pytest.approx(want, rel=1e-4), choice
