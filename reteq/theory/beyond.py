"""Extensions of Section 3 beyond two stages and plain gradient ascent.

(a) K stages: every permutation of K proximal ridge stages gives its own model; the pairwise RE distance
    between every two orders along the same GA unlearning shows path dependence is not a two-stage artefact.
(b) The exact retrain baseline: one of the stages is the forget set; for each order, theta_r learns the retain
    stages in the same order without it (retraining is itself path-dependent), and d(theta_u(t), theta_r)
    tracks how close unlearning gets to Retrain Equivalence; the best and worst orders bracket what a
    path-oblivious method can promise.
(c) NPO-like and SimNPO-like rules for squared loss, so GA can be compared with bounded methods. With residual
    r_i = x_i^T theta - y_i, each forget row gets the "log-likelihood" l_i(theta) = -r_i^2 (a Gaussian
    log-likelihood up to constants; its mean is -L_U, so minimising mean(l_i) is exactly the GA of linear.py).
    The LLM losses (reteq.algorithms) then become
      NPO(beta):    minimise mean_i -(2/beta) log sigmoid(-beta (l_i - l_i^ref)), l^ref at the start
      SimNPO(beta): minimise mean_i -(2/beta) log sigmoid(-beta l_i)
    whose gradients are GA's with a per-row weight w_i:  theta <- theta + eta (2/k) X_U^T (w * r), where
      GA: w_i = 1,  NPO: w_i = 2 sigmoid(beta (l_i - l_i^ref)),  SimNPO: w_i = 2 sigmoid(beta l_i).
    NPO equals GA on its first step (w = 1) and both weights vanish as a row's residual grows, which is why
    they slow down instead of diverging.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from reteq.theory.linear import Array, ga_trajectory, re_distance, train_path

MAX_STAGES = 6  # 720 orders; beyond that the pairwise matrix stops being a quick experiment
RULES = ("ga", "npo", "simnpo")
DEFAULT_BETA = {"npo": 0.5, "simnpo": 1.0}  # the paper's ablation beta for NPO, SimNPO's default


def _sigmoid(x: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


# ---- (c) unlearning rules ----------------------------------------------------------------------------------
def row_weights(rule: str, residual: Array, ref_residual: Array, beta: float | None) -> Array:
    """Per-row weight multiplying the GA gradient (see the module docstring for the derivation)."""
    loglik = -(residual**2)
    if rule == "ga":
        return np.ones_like(residual)
    if beta is None or not beta > 0:
        raise ValueError(f"rule {rule!r} needs beta > 0, got {beta}")
    if rule == "npo":
        return 2.0 * _sigmoid(beta * (loglik + ref_residual**2))
    if rule == "simnpo":
        return 2.0 * _sigmoid(beta * loglik)
    raise ValueError(f"unknown unlearning rule {rule!r} (known: {', '.join(RULES)})")


def unlearn_trajectory(
    theta: Array, X_U: Array, y_U: Array, eta: float, steps: int, rule: str = "ga", beta: float | None = None
) -> Array:
    """Rows t = 0..steps of the chosen local rule; 'ga' reproduces linear.ga_trajectory exactly."""
    if rule == "ga":
        return ga_trajectory(theta, X_U, y_U, eta, steps)
    if beta is None:
        beta = DEFAULT_BETA.get(rule)
    k = X_U.shape[0]
    out = np.empty((steps + 1, theta.shape[0]))
    out[0] = theta
    ref_residual = X_U @ theta - y_U
    for t in range(1, steps + 1):
        r = X_U @ out[t - 1] - y_U
        w = row_weights(rule, r, ref_residual, beta)
        out[t] = out[t - 1] + eta * (2.0 / k) * (X_U.T @ (w * r))
    return out


@dataclass(frozen=True)
class Unlearning:
    """How a model is unlearned: `steps` steps of the local `rule` (GA, NPO-like, SimNPO-like) at rate `eta`;
    beta for the bounded rules (None: DEFAULT_BETA)."""

    eta: float
    steps: int
    rule: str = "ga"
    beta: float | None = None

    def trajectory(self, theta: Array, X_U: Array, y_U: Array) -> Array:
        return unlearn_trajectory(theta, X_U, y_U, self.eta, self.steps, self.rule, self.beta)


# ---- (a) K stages ------------------------------------------------------------------------------------------
Stage = tuple[Array, Array]


@dataclass(frozen=True)
class OrderDivergence:
    orders: list[tuple[int, ...]]  # stage indices, in learning order
    trajectories: Array  # (n_orders, steps + 1, d): unlearning trajectory of each order's model
    divergence: Array  # (n_orders, n_orders, steps + 1): RE distance between every two orders at each step

    def at(self, t: int) -> Array:
        return self.divergence[:, :, t]


def _check_stages(stages: list[Stage]) -> int:
    if not 2 <= len(stages) <= MAX_STAGES:
        raise ValueError(f"need between 2 and {MAX_STAGES} stages, got {len(stages)}")
    d = stages[0][0].shape[1]
    for i, (X, y) in enumerate(stages):
        if X.ndim != 2 or X.shape[1] != d or np.shape(y) != (X.shape[0],):
            raise ValueError(f"stage {i}: X {X.shape} / y {np.shape(y)} inconsistent with d={d}")
    return d


def order_divergence(
    stages: list[Stage], X_U: Array, y_U: Array, X_test: Array, mu: float, unlearning: Unlearning
) -> OrderDivergence:
    """Learn every permutation of the stages, unlearn each with the same local rule, compare all pairs."""
    d = _check_stages(stages)
    orders = list(itertools.permutations(range(len(stages))))
    traj = np.stack(
        [
            unlearning.trajectory(train_path([stages[i] for i in order], mu, d), X_U, y_U)
            for order in orders
        ]
    )
    preds = traj @ X_test.T  # (n_orders, steps + 1, m)
    diff = preds[:, None] - preds[None, :]
    return OrderDivergence(orders, traj, (diff**2).mean(axis=-1))


# ---- (b) retrain baseline ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrainGaps:
    orders: list[tuple[int, ...]]  # orders of all stages (the forget stage included)
    gaps: Array  # (n_orders, steps + 1): d(theta_u(t), theta_r) for each order
    closest: Array  # (n_orders,): min over t of the gap, how near unlearning ever gets to its retrain model
    closest_step: Array  # (n_orders,): the step where that happens

    @property
    def best_order(self) -> tuple[int, ...]:
        return self.orders[int(np.argmin(self.closest))]

    @property
    def worst_order(self) -> tuple[int, ...]:
        return self.orders[int(np.argmax(self.closest))]


def retrain_gaps(
    stages: list[Stage],
    forget_index: int,
    X_test: Array,
    mu: float,
    unlearning: Unlearning,
    orders: list[tuple[int, ...]] | None = None,
) -> RetrainGaps:
    """For each order: learn all stages, unlearn stages[forget_index], compare with retraining without it."""
    d = _check_stages(stages)
    if not 0 <= forget_index < len(stages):
        raise ValueError(f"forget_index {forget_index} is not a stage index (0..{len(stages) - 1})")
    X_U, y_U = stages[forget_index]
    orders = (
        list(itertools.permutations(range(len(stages)))) if orders is None else [tuple(o) for o in orders]
    )
    for order in orders:
        if sorted(order) != list(range(len(stages))):
            raise ValueError(f"order {order} is not a permutation of the {len(stages)} stages")
    gaps = np.empty((len(orders), unlearning.steps + 1))
    for row, order in enumerate(orders):
        learned = train_path([stages[i] for i in order], mu, d)
        retrained = train_path([stages[i] for i in order if i != forget_index], mu, d)
        traj = unlearning.trajectory(learned, X_U, y_U)
        gaps[row] = re_distance(X_test, traj, retrained[None, :])
    return RetrainGaps(orders, gaps, gaps.min(axis=1), gaps.argmin(axis=1))


def rule_divergence(
    theta_a: Array, theta_b: Array, X_U: Array, y_U: Array, X_test: Array, unlearning: Unlearning
) -> Array:
    """d between two models unlearned with the same rule, t = 0..steps (GA, NPO-like or SimNPO-like)."""
    a = unlearning.trajectory(theta_a, X_U, y_U)
    b = unlearning.trajectory(theta_b, X_U, y_U)
    out = re_distance(X_test, a, b)
    if not np.all(np.isfinite(out)):
        u = unlearning
        raise FloatingPointError(f"{u.rule} divergence overflowed within {u.steps} steps (eta {u.eta})")
    return out
