"""Section 3 closed forms (pure numpy, fast): Lemma 3.2, Theorem 3.1 on many random instances, input checks,
and the extensions (K stages, retrain baseline, NPO-like and SimNPO-like rules)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from reteq.theory.beyond import (
    Unlearning,
    order_divergence,
    retrain_gaps,
    row_weights,
    rule_divergence,
    unlearn_trajectory,
)
from reteq.theory.linear import (
    Instance,
    bound_check,
    delta_closed_form,
    forget_projector,
    make_instance,
    onset_step,
    re_distance,
)

STEPS = 30


def _instances(count: int):
    """A spread of settings (over- and under-parameterized, small and large steps), seeds varying fastest."""
    settings = list(itertools.product((12, 30, 60), ((4, 6), (10, 15)), (1, 3), (0.3, 2.0), (0.4, 1.0)))
    for i in range(count):
        d, (n_a, n_b), k, mu, eta = settings[i % len(settings)]
        yield make_instance(d, n_a, n_b, k, m=max(3 * k, 20), mu=mu, eta=eta, seed=1000 + i)


def test_lemma_3_2_delta_is_a_matrix_power_of_delta0():
    for inst in _instances(12):
        a, b = inst.unlearn(inst.theta_ab, STEPS), inst.unlearn(inst.theta_ba, STEPS)
        for t in (0, 1, 7, STEPS):
            closed = delta_closed_form(inst.delta0, inst.M_U, t)
            assert np.linalg.norm((a[t] - b[t]) - closed) <= 1e-8 * np.linalg.norm(closed)


def test_forget_projector_and_p_u_delta0_nonzero_for_continuous_draws():
    for inst in _instances(40):
        P = forget_projector(inst.X_U)
        assert np.allclose(P @ P, P, atol=1e-10) and np.allclose(P, P.T, atol=1e-12)
        assert np.allclose(P @ inst.X_U.T, inst.X_U.T, atol=1e-10)
        assert np.linalg.norm(inst.delta0) > 0
        assert np.linalg.norm(P @ inst.delta0) > 1e-6 * np.linalg.norm(inst.delta0)


def test_theorem_3_1_bound_holds_on_240_random_instances():
    held, nonvacuous = 0, 0
    for inst in _instances(240):
        q = inst.theorem()
        divergence, bound = inst.divergence(STEPS), inst.bound(STEPS)
        # the onset step is where sigma_U ||P_U Delta_0|| (1 + rho*)^t first reaches 2 C0
        if q.t0 <= STEPS and q.C0 > 0:
            t = max(q.t0, 0)
            assert q.sigma_U * q.pu_delta_norm * (1 + q.rho_star) ** t >= 2 * q.C0 * (1 - 1e-12)
        ok, checked = bound_check(divergence, bound, q.t0)
        held += ok
        nonvacuous += checked > 0
    assert held == 240
    assert nonvacuous >= 200  # the check must bite, not hold because t0 lies beyond the horizon


def test_rho_star_lies_in_the_spectrum_of_m_u_on_the_forget_space():
    for inst in _instances(20):
        eig = np.linalg.eigvalsh(inst.M_U)[-inst.k :]  # the k nonzero eigenvalues
        assert eig[0] - 1e-12 <= inst.theorem().rho_star <= eig[-1] + 1e-12


def test_bound_check_detects_a_violation():
    assert bound_check(np.array([1.0, 1.0, 1.0]), np.array([0.5, 2.0, 0.5]), t0=0) == (False, 3)
    assert bound_check(np.array([1.0, 1.0, 1.0]), np.array([0.5, 2.0, 0.5]), t0=2) == (True, 1)
    assert bound_check(np.array([1.0, 1.0]), np.array([5.0, 5.0]), t0=7) == (True, 0)
    assert onset_step(0.0, 1.0, 1.0, 0.5) == 0
    assert onset_step(4.0, 1.0, 1.0, 1.0) == 3  # log2(8) = 3


@pytest.mark.parametrize("k,m", [(1, 1), (3, 3), (3, 10), (8, 40)])
def test_sigma_u_positive_when_m_at_least_k(k, m):
    inst = make_instance(d=20, n_a=3, n_b=4, k=k, m=m, mu=1.0, eta=0.5, seed=k * 100 + m)
    q = inst.theorem()
    basis = np.linalg.qr(inst.X_U.T)[0]  # orthonormal basis of the forget row space
    assert q.sigma_U > 0
    assert q.sigma_U == pytest.approx(np.linalg.svd(inst.X_test @ basis, compute_uv=False).min(), rel=1e-8)


def _valid_parts(seed: int = 0):
    inst = make_instance(d=10, n_a=3, n_b=3, k=2, m=8, mu=1.0, eta=0.5, seed=seed)
    return dict(
        X_A=inst.X_A,
        y_A=inst.y_A,
        X_B=inst.X_B,
        y_B=inst.y_B,
        X_U=inst.X_U,
        y_U=inst.y_U,
        X_test=inst.X_test,
        mu=1.0,
        eta=0.5,
    )


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda p: p.update(mu=0.0), "mu must be"),
        (lambda p: p.update(mu=-1.0), "mu must be"),
        (lambda p: p.update(eta=0.0), "eta must be"),
        (lambda p: p.update(eta=-0.1), "eta must be"),
        (lambda p: p.update(X_U=np.vstack([p["X_U"][0], 2 * p["X_U"][0]])), "rank-deficient"),
        (lambda p: p.update(X_U=np.ones((12, 10)), y_U=np.ones(12)), "k > d"),
        (lambda p: p.update(y_A=np.ones(5)), "targets for X_A"),
        (lambda p: p.update(X_B=np.ones((3, 9))), "X_B has shape"),
        (lambda p: p.update(X_test=np.ones((1, 10))), "test rows < k"),
        (lambda p: p.update(X_U=np.ones(10)), "X_U must be a"),
    ],
)
def test_invalid_instances_raise_one_clear_line(change, message):
    parts = _valid_parts()
    change(parts)
    with pytest.raises(ValueError, match=message) as info:
        Instance(**parts)
    assert "\n" not in str(info.value)


def test_make_instance_rejects_k_greater_than_d_and_bad_sizes():
    with pytest.raises(ValueError, match="k > d"):
        make_instance(d=4, n_a=2, n_b=2, k=5, m=8, mu=1.0, eta=0.5, seed=0)
    with pytest.raises(ValueError, match="n_a must be a positive integer"):
        make_instance(d=4, n_a=0, n_b=2, k=1, m=8, mu=1.0, eta=0.5, seed=0)


def test_overparameterization_is_reported_not_required():
    small = make_instance(d=8, n_a=6, n_b=6, k=2, m=8, mu=1.0, eta=0.5, seed=3)
    assert not small.overparameterized
    ok, _ = bound_check(small.divergence(STEPS), small.bound(STEPS), small.theorem().t0)
    assert ok
    assert make_instance(d=40, n_a=6, n_b=6, k=2, m=8, mu=1.0, eta=0.5, seed=3).overparameterized


# ---- beyond: K stages, retrain baseline, NPO-like and SimNPO-like rules ------------------------------------
def _stages(inst: Instance):
    return [(inst.X_A, inst.y_A), (inst.X_B, inst.y_B), (inst.X_U, inst.y_U)]


def test_k_stage_divergence_matrix_is_symmetric_with_zero_diagonal():
    inst = make_instance(d=30, n_a=4, n_b=5, k=2, m=20, mu=1.0, eta=0.5, seed=7)
    extra = (
        np.random.default_rng(1).normal(size=(3, 30)) / np.sqrt(30),
        np.random.default_rng(2).normal(size=3),
    )
    od = order_divergence([*_stages(inst)[:2], extra], inst.X_U, inst.y_U, inst.X_test, inst.mu,
                          Unlearning(inst.eta, 10))
    assert len(od.orders) == 6 and od.divergence.shape == (6, 6, 11)
    for t in (0, 5, 10):
        D = od.at(t)
        assert np.allclose(D, D.T, rtol=1e-12, atol=0)
        assert np.all(np.diag(D) == 0)
        assert np.all(D[~np.eye(6, dtype=bool)] > 0)
    # GA amplifies every pairwise gap
    off = ~np.eye(6, dtype=bool)
    assert np.all(od.at(10)[off] > od.at(0)[off])


def test_retrain_gaps_and_exact_undo_of_a_last_stage():
    """With S_U learned last and eta = k / (2 mu), one GA step inverts the last proximal stage exactly,
    so those orders reach their retrain model at t = 1 while the others do not."""
    k, mu = 2, 2.0
    inst = make_instance(d=30, n_a=4, n_b=5, k=k, m=20, mu=mu, eta=k / (2 * mu), seed=11)
    rg = retrain_gaps(_stages(inst), 2, inst.X_test, inst.mu, Unlearning(inst.eta, 8))
    assert rg.gaps.shape == (6, 9) and np.all(np.isfinite(rg.gaps)) and np.all(rg.gaps >= 0)
    scale = rg.gaps[:, 0].max()
    for order, row in zip(rg.orders, rg.gaps):
        if order[-1] == 2:
            assert row[1] <= 1e-20 * scale
        else:
            assert row[1] > 1e-6 * scale
    assert rg.best_order[-1] == 2 and rg.worst_order[-1] != 2
    assert rg.closest[rg.orders.index(rg.best_order)] == rg.closest.min()
    # the retrain models of the U-last orders are the theorem's theta_AB, theta_BA
    learned = unlearn_trajectory(inst.theta_ab, inst.X_U, inst.y_U, inst.eta, 0)[0]
    assert re_distance(inst.X_test, learned, inst.theta_ab) == 0.0


def test_retrain_gaps_rejects_bad_input():
    inst = make_instance(d=20, n_a=3, n_b=3, k=2, m=10, mu=1.0, eta=0.5, seed=0)
    with pytest.raises(ValueError, match="forget_index"):
        retrain_gaps(_stages(inst), 3, inst.X_test, 1.0, Unlearning(0.5, 4))
    with pytest.raises(ValueError, match="not a permutation"):
        retrain_gaps(_stages(inst), 2, inst.X_test, 1.0, Unlearning(0.5, 4), orders=[(0, 0, 2)])


def test_npo_and_simnpo_like_rules_move_theta_and_stay_bounded():
    inst = make_instance(d=30, n_a=4, n_b=5, k=3, m=20, mu=1.0, eta=1.0, seed=5)
    ga = unlearn_trajectory(inst.theta_ab, inst.X_U, inst.y_U, inst.eta, 20, "ga")
    npo = unlearn_trajectory(inst.theta_ab, inst.X_U, inst.y_U, inst.eta, 20, "npo", 0.5)
    simnpo = unlearn_trajectory(inst.theta_ab, inst.X_U, inst.y_U, inst.eta, 20, "simnpo", 1.0)
    for traj in (npo, simnpo):
        assert np.linalg.norm(traj[-1] - traj[0]) > 1e-3
        assert not np.allclose(traj[-1], ga[-1])
    assert np.allclose(npo[1], ga[1], rtol=1e-12, atol=1e-14)  # NPO's weights are 1 at its reference
    div = {
        rule: rule_divergence(
            inst.theta_ab, inst.theta_ba, inst.X_U, inst.y_U, inst.X_test, Unlearning(inst.eta, 20, rule)
        )
        for rule in ("ga", "npo", "simnpo")
    }
    assert div["ga"][-1] > 100 * max(div["npo"][-1], div["simnpo"][-1])
    assert div["npo"][-1] > 0 and div["simnpo"][-1] > 0
    with pytest.raises(ValueError, match="unknown unlearning rule"):
        unlearn_trajectory(inst.theta_ab, inst.X_U, inst.y_U, inst.eta, 2, "dpo", 1.0)
    r = np.array([0.0, 1.0, -3.0])
    assert np.all((row_weights("simnpo", r, r, 1.0) > 0) & (row_weights("simnpo", r, r, 1.0) <= 1))


@pytest.mark.parametrize("rule,beta", [("ga", None), ("npo", 0.5), ("simnpo", 1.0)])
def test_rules_are_the_registry_losses_with_minus_squared_residual_as_log_likelihood(rule, beta):
    """Cross-check against reteq.algorithms (torch): one step of our rule = one SGD step on its loss."""
    torch = pytest.importorskip("torch")
    from reteq.algorithms import get_algorithm
    from reteq.algorithms.base import MethodInputs

    inst = make_instance(d=15, n_a=3, n_b=3, k=4, m=8, mu=1.0, eta=0.3, seed=2)
    start = unlearn_trajectory(inst.theta_ab, inst.X_U, inst.y_U, inst.eta, 3, rule, beta)[3]  # away from ref
    X, y = torch.tensor(inst.X_U), torch.tensor(inst.y_U)
    ref_logp = -((X @ torch.tensor(inst.theta_ab) - y) ** 2)
    theta = torch.tensor(start, requires_grad=True)
    logp = -((X @ theta - y) ** 2)
    params = {} if beta is None else {"beta": beta}
    loss = get_algorithm(rule).loss(MethodInputs.of_sequences(logp, ref_logp), params) / len(logp)  # the mean
    loss.backward()
    expected = start - inst.eta * theta.grad.numpy()
    # our trajectory's NPO reference is its own start, so restart it from theta_ab and take 4 steps
    ours = unlearn_trajectory(inst.theta_ab, inst.X_U, inst.y_U, inst.eta, 4, rule, beta)[4]
    assert np.allclose(ours, expected, rtol=1e-10, atol=1e-12)
