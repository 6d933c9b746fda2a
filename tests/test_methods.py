"""The local unlearning methods beyond the paper's three: each loss is its formula (checked by hand with `math` on
small float64 inputs). What each declares: tests/test_method_registry.py; each unlearning on the tiny model:
tests/test_methods_unlearn.py.

Contract (reteq.algorithms.base): a loss returns the micro-batch's SUM of per-unit losses; minimising it pushes the
forget responses down.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import model_cfg, refusal_finetune, reteq_cache  # noqa: F401  (session fixture)

from reteq.algorithms import RETAIN_WEIGHT, get_algorithm
from reteq.algorithms.base import MethodInputs
from reteq.algorithms.ceu import position_in_sequence
from reteq.algorithms.rmu import control_vector
from reteq.algorithms.undial import undial_target

F64 = torch.float64



def _t(values, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=F64, requires_grad=grad)


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


def _lse(row: list[float]) -> float:
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


def _log_softmax(row: list[float]) -> list[float]:
    lse = _lse(row)
    return [v - lse for v in row]


def _softmax(row: list[float]) -> list[float]:
    return [math.exp(v) for v in _log_softmax(row)]


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _seq(n: int) -> MethodInputs:
    """A MethodInputs of n dummy sequences (token-level methods read only their token fields)."""
    return MethodInputs(torch.zeros(n, dtype=F64), torch.ones(n, dtype=torch.long))


# ---- WGA and SatImp: token-weighted GA -------------------------------------------------------------------------------

PROBS = [0.5, 0.2, 0.9, 0.01]


@pytest.mark.parametrize("beta", [1.0, 2.0, 0.0])
def test_wga_weights_each_tokens_log_prob_by_its_probability(beta):
    logp = _t([math.log(p) for p in PROBS], grad=True)
    x = _seq(2)
    x.token_logp, x.token_owner = logp, torch.tensor([0, 0, 1, 1])
    loss = get_algorithm("wga").loss(x, {"beta": beta})
    loss.backward()
    assert _f(loss) == pytest.approx(sum(p ** beta * math.log(p) for p in PROBS), rel=1e-12)
    # the weight is detached: d loss / d log p_t = p_t^beta > 0, so minimising pushes every token down
    assert logp.grad.tolist() == pytest.approx([p ** beta for p in PROBS], rel=1e-12)
    if beta == 0.0:  # beta 0 is GA
        assert _f(loss) == pytest.approx(sum(math.log(p) for p in PROBS), rel=1e-12)


@pytest.mark.parametrize("beta1,beta2", [(5.0, 1.0), (1.0, 2.0), (0.0, 0.0)])
def test_satimp_weights_by_saturation_and_importance(beta1, beta2):
    logp = _t([math.log(p) for p in PROBS], grad=True)
    x = _seq(2)
    x.token_logp, x.token_owner = logp, torch.tensor([0, 0, 1, 1])
    loss = get_algorithm("satimp").loss(x, {"beta1": beta1, "beta2": beta2})
    loss.backward()
    weights = [p ** beta1 * (1 - p) ** beta2 for p in PROBS]
    assert _f(loss) == pytest.approx(sum(w * math.log(p) for w, p in zip(weights, PROBS)), rel=1e-12)
    assert logp.grad.tolist() == pytest.approx(weights, rel=1e-12)


# ---- UNDIAL, CE-U, ME: full-vocabulary losses ------------------------------------------------------------------------

LOGITS = [[2.0, 0.5, -1.0, 0.0], [0.1, 3.0, 0.2, -0.7], [1.0, 1.0, 1.0, 1.0], [-2.0, 0.0, 4.0, 1.5],
          [0.3, -0.3, 0.9, 2.2]]
REF_LOGITS = [[1.5, 0.0, -0.5, 0.5], [0.0, 2.5, 0.0, 0.0], [0.2, 1.4, -1.0, 0.3], [-1.0, 0.5, 3.0, 1.0],
              [0.0, 0.0, 0.0, 2.0]]
LABELS = [0, 1, 3, 2, 3]
OWNER = [0, 0, 0, 1, 1]  # two sequences: three response tokens, then two


def _full(owner=OWNER) -> tuple[MethodInputs, torch.Tensor]:
    logits = _t(LOGITS, grad=True)
    x = _seq(max(owner) + 1)
    x.logits, x.labels, x.token_owner = logits, torch.tensor(LABELS), torch.tensor(owner)
    x.ref_logits = _t(REF_LOGITS)
    return x, logits


@pytest.mark.parametrize("strength", [10.0, 1.0, 0.0])
def test_undial_distils_from_the_reference_with_the_label_demoted(strength):
    x, logits = _full()
    loss = get_algorithm("undial").loss(x, {"strength": strength})
    loss.backward()
    want, grads = 0.0, []
    for z, r, y in zip(LOGITS, REF_LOGITS, LABELS):
        q = _softmax([rv - (strength if v == y else 0.0) for v, rv in enumerate(r)])
        want += -sum(qv * lv for qv, lv in zip(q, _log_softmax(z)))
        grads.append([pv - qv for pv, qv in zip(_softmax(z), q)])  # d CE / d z = softmax(z) - q
    assert _f(loss) == pytest.approx(want, rel=1e-12)
    assert logits.grad.tolist() == [pytest.approx(g, abs=1e-12) for g in grads]
    # the target: pi_ref with only the label's logit lowered by `strength`
    target = undial_target(_t(REF_LOGITS), torch.tensor(LABELS), strength)
    r, y = REF_LOGITS[0], LABELS[0]
    denom = sum(math.exp(v) for v in r) - math.exp(r[y]) + math.exp(r[y] - strength)
    assert target[0, y].item() == pytest.approx(math.exp(r[y] - strength) / denom, rel=1e-12)
    assert target[0, 1].item() == pytest.approx(math.exp(r[1]) / denom, rel=1e-12)
    if strength == 10.0:  # the label is well above its target: minimising lowers its logit
        assert all(logits.grad[t, y] > 0 for t, y in enumerate(LABELS))


def _ceu_by_hand(kept: list[int]) -> tuple[float, list[list[float]]]:
    loss, grads = 0.0, [[0.0] * 4 for _ in LOGITS]
    for t in kept:
        z, y = LOGITS[t], LABELS[t]
        rest = _lse([v for i, v in enumerate(z) if i != y])
        q = [0.0 if i == y else math.exp(v - rest) for i, v in enumerate(z)]
        loss += -sum(qv * lv for qv, lv in zip(q, _log_softmax(z)))
        grads[t] = [pv - qv for pv, qv in zip(_softmax(z), q)]
    return loss, grads


@pytest.mark.parametrize("ignore_first,kept", [(1, [1, 2, 4]), (0, [0, 1, 2, 3, 4]), (2, [2]), (3, [])])
def test_ceu_masks_the_label_and_skips_each_sequences_first_tokens(ignore_first, kept):
    x, logits = _full()
    loss = get_algorithm("ceu").loss(x, {"ignore_first": ignore_first})
    loss.backward()
    want, grads = _ceu_by_hand(kept)
    assert _f(loss) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert logits.grad.tolist() == [pytest.approx(g, abs=1e-12) for g in grads]
    for t in kept:  # minimising moves mass off the label only: d/dz_y = p_y > 0
        assert logits.grad[t, LABELS[t]] > 0


def test_ceu_positions_follow_the_owner_runs_in_any_sequence_order():
    """A packed batch lists its samples in row order, not by position in batch.index."""
    assert position_in_sequence(torch.tensor(OWNER)).tolist() == [0, 1, 2, 0, 1]
    assert position_in_sequence(torch.tensor([1, 1, 0, 0, 0, 2])).tolist() == [0, 1, 0, 1, 2, 0]
    assert position_in_sequence(torch.tensor([], dtype=torch.long)).tolist() == []
    x, _ = _full(owner=[1, 1, 0, 0, 0])
    want, _ = _ceu_by_hand([1, 3, 4])
    assert _f(get_algorithm("ceu").loss(x, {"ignore_first": 1})) == pytest.approx(want, rel=1e-12)


def test_me_is_the_kl_from_uniform():
    x, logits = _full()
    loss = get_algorithm("me").loss(x, {})
    loss.backward()
    v = 4
    want = sum(-math.log(v) - sum(_log_softmax(z)) / v for z in LOGITS)
    assert _f(loss) == pytest.approx(want, rel=1e-12)
    # d/dz_k = p_k - 1/V: minimising lowers every token above uniform, the label included
    assert logits.grad.tolist() == [pytest.approx([p - 1 / v for p in _softmax(z)], abs=1e-12) for z in LOGITS]
    x.logits = _t([[0.7] * 4, [-3.0] * 4])
    assert _f(get_algorithm("me").loss(x, {})) == pytest.approx(0.0, abs=1e-12)  # uniform: nothing to forget


# ---- IdkNLL and IdkDPO: the alternative answers ----------------------------------------------------------------------

SEQ = [-12.0, -30.0, -5.0]
REF = [-10.0, -31.0, -5.0]
ALT = [-6.0, -20.0, -9.0]
REF_ALT = [-8.0, -18.0, -9.0]
ALT_TOKENS = [3, 4, 5]


def _alt(seq=SEQ, ref=REF, alt=ALT, ref_alt=REF_ALT) -> tuple[MethodInputs, torch.Tensor, torch.Tensor]:
    logp, a = _t(seq, grad=True), _t(alt, grad=True)
    x = MethodInputs(logp, torch.tensor([4, 6, 2]), ref_seq_logp=_t(ref), alt_seq_logp=a,
                     alt_seq_tokens=torch.tensor(ALT_TOKENS), ref_alt_seq_logp=_t(ref_alt))
    return x, logp, a


def test_idknll_is_the_alternatives_token_mean_nll():
    x, _, alt = _alt()
    loss = get_algorithm("idknll").loss(x, {})
    loss.backward()
    assert _f(loss) == pytest.approx(6 / 3 + 20 / 4 + 9 / 5, rel=1e-12)
    assert alt.grad.tolist() == pytest.approx([-1 / 3, -1 / 4, -1 / 5], rel=1e-12)  # minimising raises them


def test_idknll_batch_token_mean_is_the_steps_token_mean():
    """batch_token_mean 1 (TOFU): sum_i NLL_i / mean |a| per micro-batch, so that the loop's division by the step's
    sequences gives the token mean over all the step's alternative tokens, micro-batches included."""
    x, _, alt = _alt()
    x.alt_mean_tokens = 5.0  # the whole step's mean alternative length (here: a step of 6 sequences, 30 tokens)
    loss = get_algorithm("idknll").loss(x, {"batch_token_mean": 1})
    loss.backward()
    assert _f(loss) == pytest.approx((6 + 20 + 9) / 5, rel=1e-12)
    assert _f(loss) / 6 == pytest.approx(35 / 30, rel=1e-12)  # divided by the step's 6 sequences: per token
    assert alt.grad.tolist() == pytest.approx([-1 / 5] * 3, rel=1e-12)  # every token weighs the same
    assert _f(get_algorithm("idknll").loss(_alt()[0], {"batch_token_mean": 0})) == pytest.approx(
        6 / 3 + 20 / 4 + 9 / 5, rel=1e-12)  # 0: the default, unchanged
    with pytest.raises(ValueError, match="idknll needs the step's mean alternative length"):
        get_algorithm("idknll").loss(_alt()[0], {"batch_token_mean": 1})


def test_simnpo_length_norm_is_fan_et_al():
    """length_norm 1: -(2/beta) log sigmoid(-beta log pi(y) / |y|); 0 (the default) the summed log-prob."""
    logp = _t([-6.0, -2.0], grad=True)
    x = MethodInputs(logp, torch.tensor([3, 1]))
    beta = 2.5
    loss = get_algorithm("simnpo").loss(x, {"beta": beta, "length_norm": 1})
    loss.backward()
    # both scores are -2: 2 x -(2/2.5) log sigmoid(5) = 1.6 log(1 + e^-5)
    assert _f(loss) == pytest.approx(1.6 * math.log1p(math.exp(-5)), rel=1e-12)
    # d/dlogp_i = (2/beta) sigmoid(beta s_i) beta / |y_i| = 2 sigmoid(-5) / |y_i|
    assert logp.grad.tolist() == pytest.approx([2 * _sigmoid(-5) / 3, 2 * _sigmoid(-5)], rel=1e-12)
    summed = get_algorithm("simnpo").loss(MethodInputs(_t([-6.0, -2.0]), torch.tensor([3, 1])), {"beta": beta})
    assert _f(summed) == pytest.approx(0.8 * (math.log1p(math.exp(-15)) + math.log1p(math.exp(-5))), rel=1e-12)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_idkdpo_prefers_the_alternative_over_the_forget_response(beta):
    x, logp, alt = _alt()
    loss = get_algorithm("idkdpo").loss(x, {"beta": beta})
    loss.backward()
    margins = [(a - ra) - (s - r) for s, r, a, ra in zip(SEQ, REF, ALT, REF_ALT)]
    want = sum(-(2 / beta) * math.log(_sigmoid(beta * m)) for m in margins)
    assert _f(loss) == pytest.approx(want, rel=1e-12)
    # d/d logp = 2 sigmoid(-beta m) > 0 (push the forget response down), d/d alt the opposite
    assert logp.grad.tolist() == pytest.approx([2 * _sigmoid(-beta * m) for m in margins], rel=1e-12)
    assert alt.grad.tolist() == pytest.approx([-2 * _sigmoid(-beta * m) for m in margins], rel=1e-12)


def test_idkdpo_at_the_reference_is_2_ln2_over_beta_per_sequence():
    x, _, _ = _alt(ref=SEQ, ref_alt=ALT)
    assert _f(get_algorithm("idkdpo").loss(x, {"beta": 0.1})) == pytest.approx(3 * 20 * math.log(2), rel=1e-12)


# ---- RMU: hidden states towards a fixed random direction -------------------------------------------------------------

def test_rmu_control_vector_is_seeded_fixed_and_has_norm_coeff():
    u = control_vector(6, 20.0)
    assert torch.equal(u, control_vector(6, 20.0))  # same for every leaf, whatever the global RNG did
    torch.manual_seed(123)
    assert torch.equal(u, control_vector(6, 20.0))
    assert math.sqrt(sum(v * v for v in u.tolist())) == pytest.approx(20.0, rel=1e-12)
    assert all(v >= 0 for v in u.tolist())  # torch.rand: a direction in the positive orthant, as the original
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(6, generator=g, dtype=F64).tolist()
    norm = math.sqrt(sum(v * v for v in raw))
    assert u.tolist() == pytest.approx([20.0 * v / norm for v in raw], rel=1e-12)
    assert control_vector(6, 5.0).tolist() == pytest.approx([5.0 / 20.0 * v for v in u.tolist()], rel=1e-12)
    like = torch.zeros(1, dtype=torch.float32)
    assert control_vector(6, 20.0, like).dtype == torch.float32


def test_rmu_is_the_mean_squared_distance_to_the_control_vector():
    hidden_rows = [[0.5, -1.0, 2.0, 0.0], [3.0, 1.0, -2.0, 4.0], [0.0, 0.0, 0.0, 0.0]]
    hidden = _t(hidden_rows, grad=True)
    x = _seq(2)
    x.hidden, x.token_owner = hidden, torch.tensor([0, 0, 1])
    loss = get_algorithm("rmu").loss(x, {"layer": 1, "coeff": 7.0, RETAIN_WEIGHT: 0.0})
    loss.backward()
    target = control_vector(4, 7.0).tolist()
    want = sum(sum((h - c) ** 2 for h, c in zip(row, target)) / 4 for row in hidden_rows)
    assert _f(loss) == pytest.approx(want, rel=1e-12)
    assert hidden.grad.tolist() == [pytest.approx([2 * (h - c) / 4 for h, c in zip(row, target)], rel=1e-12)
                                    for row in hidden_rows]
    x.hidden = torch.stack([control_vector(4, 7.0)] * 3)
    assert _f(get_algorithm("rmu").loss(x, {"layer": 1, "coeff": 7.0})) == pytest.approx(0.0, abs=1e-24)


# ---- GradDiff and NPO+RT: the paper's methods plus the loop's retain term ---------------------------------------------

@pytest.mark.parametrize("weight", [0.0, 2.5])
def test_graddiff_is_ga_and_npo_retain_is_npo_in_the_loss(weight):
    """The retain term is the loop's (recipes.unlearn), so the loss functions equal GA's and NPO's at any
    retain_weight; at retain_weight 0 the loop adds nothing either (see the integration test)."""
    x, _, _ = _alt()
    ga = get_algorithm("ga").loss(x, {})
    assert _f(get_algorithm("graddiff").loss(x, {RETAIN_WEIGHT: weight})) == _f(ga) == sum(SEQ)
    for beta in (0.5, 0.1):
        npo = get_algorithm("npo").loss(x, {"beta": beta})
        assert _f(get_algorithm("npo_retain").loss(x, {"beta": beta, RETAIN_WEIGHT: weight})) == _f(npo)
