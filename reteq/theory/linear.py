"""Section 3 of the paper in closed form: staged proximal ridge, gradient-ascent unlearning, Theorem 3.1.

Why closed forms: the theorem is a statement about exact linear algebra, so every quantity here is computed
the way the paper writes it (float64, `solve`/`lstsq`, never an explicit inverse) and the tests can check
Lemma 3.2 and the bound to rounding error instead of to an optimiser's tolerance.

Setting. theta in R^d; a stage S = (X, y) solves  min ||X theta - y||^2 + mu ||theta - theta_prev||^2, i.e.
theta = (X^T X + mu I)^-1 (X^T y + mu theta_prev).  theta_AB learns S_A then S_B from theta_0 = 0,
theta_BA the reverse.  Unlearning is gradient ASCENT on L_U = (1/k)||X_U theta - y_U||^2 with step eta, so
Delta_t = theta_AB(t) - theta_BA(t) = (I + M_U)^t Delta_0 with M_U = (2 eta / k) X_U^T X_U (Lemma 3.2).

Assumptions, decided here (and checked by `Instance`):
- k <= d and X_U has full row rank k, mu > 0, eta > 0 (the theorem's hypotheses).
- m >= k test rows: the proof needs ||X_test v|| >= sigma_U ||v|| on the row space of X_U, which holds only
  when X_test P_U has rank k; with m < k the "smallest nonzero singular value" bound is not a theorem, so we
  refuse.
- Overparameterization d > n_a + n_b + k is the paper's regime (every stage is interpolable, so the order acts
  only through the proximal bias) but the bound's proof never uses it: it is reported (`overparameterized`),
  not required, so the grid may also probe d <= n_a + n_b + k.
- Features are drawn N(0, 1/d) so rows have unit norm on average and eta means the same thing for every d
  (the eigenvalues of M_U are about 2 eta / k when d >> k); targets are independent N(0, 1) draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

Array = np.ndarray


# ---- stages ------------------------------------------------------------------------------------------------
def ridge_stage(X: Array, y: Array, mu: float, theta_prev: Array) -> Array:
    """One proximal ridge stage: argmin ||X theta - y||^2 + mu ||theta - theta_prev||^2 (a d x d solve)."""
    d = X.shape[1]
    return np.linalg.solve(X.T @ X + mu * np.eye(d), X.T @ y + mu * theta_prev)


def train_path(stages: list[tuple[Array, Array]], mu: float, d: int, theta0: Array | None = None) -> Array:
    """Learn the stages in the given order, each starting from the previous stage's solution."""
    theta = np.zeros(d) if theta0 is None else np.asarray(theta0, dtype=np.float64).copy()
    for X, y in stages:
        theta = ridge_stage(X, y, mu, theta)
    return theta


# ---- unlearning --------------------------------------------------------------------------------------------
def forget_loss_grad(theta: Array, X_U: Array, y_U: Array) -> Array:
    """Gradient of L_U(theta) = (1/k) ||X_U theta - y_U||^2."""
    return (2.0 / X_U.shape[0]) * X_U.T @ (X_U @ theta - y_U)


def ga_trajectory(theta: Array, X_U: Array, y_U: Array, eta: float, steps: int) -> Array:
    """Gradient ascent on the forget loss: rows t = 0..steps of theta_t = theta_{t-1} + eta * grad L_U."""
    out = np.empty((steps + 1, theta.shape[0]))
    out[0] = theta
    for t in range(1, steps + 1):
        out[t] = out[t - 1] + eta * forget_loss_grad(out[t - 1], X_U, y_U)
    return out


def unlearning_operator(X_U: Array, eta: float) -> Array:
    """M_U = (2 eta / k) X_U^T X_U, so one GA step maps a difference of two models by (I + M_U)."""
    return (2.0 * eta / X_U.shape[0]) * (X_U.T @ X_U)


def delta_closed_form(delta0: Array, M_U: Array, t: int) -> Array:
    """Lemma 3.2: Delta_t = (I + M_U)^t Delta_0."""
    return np.linalg.matrix_power(np.eye(M_U.shape[0]) + M_U, t) @ delta0


def forget_projector(X_U: Array) -> Array:
    """P_U = X_U^T (X_U X_U^T)^-1 X_U, the orthogonal projector onto the row space of X_U."""
    return X_U.T @ np.linalg.solve(X_U @ X_U.T, X_U)


# ---- theorem quantities ------------------------------------------------------------------------------------
def re_distance(X_test: Array, a: Array, b: Array) -> Array:
    """RE distance (Def. 2.1) for linear predictors: (1/m) ||X_test (a - b)||^2; a, b may be (T, d) stacks."""
    diff = np.atleast_2d(np.asarray(a) - np.asarray(b))
    out = ((diff @ X_test.T) ** 2).mean(axis=1)
    return out if np.ndim(a) > 1 or np.ndim(b) > 1 else out[0]


def rho_star(delta0: Array, M_U: Array, P_U: Array) -> float:
    """rho* = <P_U Delta_0, M_U P_U Delta_0> / ||P_U Delta_0||^2, the Rayleigh quotient setting the growth."""
    v = P_U @ delta0
    return float(v @ (M_U @ v) / (v @ v))


def smallest_nonzero_singular_value(A: Array, rtol: float | None = None) -> float:
    """The smallest singular value above the usual numerical-rank threshold (as np.linalg.matrix_rank)."""
    s = np.linalg.svd(A, compute_uv=False)
    if s.size == 0 or s[0] == 0:
        return 0.0
    tol = s[0] * max(A.shape) * np.finfo(np.float64).eps if rtol is None else s[0] * rtol
    return float(s[s > tol].min())


def bound_curve(sigma_U: float, pu_delta_norm: float, rho: float, m: int, steps: int) -> Array:
    """Theorem 3.1's lower bound sigma_U^2 ||P_U Delta_0||^2 (1 + rho*)^(2t) / (4m) for t = 0..steps."""
    t = np.arange(steps + 1, dtype=np.float64)
    return sigma_U**2 * pu_delta_norm**2 * np.exp(2.0 * t * math.log1p(rho)) / (4.0 * m)


def onset_step(C0: float, sigma_U: float, pu_delta_norm: float, rho: float) -> int:
    """t0 = ceil(log(2 C0 / (sigma_U ||P_U Delta_0||)) / log(1 + rho*)); C0 = 0 gives t0 = 0."""
    if C0 == 0.0:
        return 0
    return int(math.ceil(math.log(2.0 * C0 / (sigma_U * pu_delta_norm)) / math.log1p(rho)))


@dataclass(frozen=True)
class TheoremQuantities:
    """Everything Theorem 3.1 needs, for one Delta_0 and one forget/test design."""

    rho_star: float
    sigma_U: float
    C0: float
    t0: int
    pu_delta_norm: float  # ||P_U Delta_0||
    perp_delta_norm: float  # ||(I - P_U) Delta_0||


def theorem_quantities(delta0: Array, X_U: Array, X_test: Array, eta: float) -> TheoremQuantities:
    """rho*, sigma_U, C0 = ||X_test||_op ||(I - P_U) Delta_0|| and t0 for a given Delta_0."""
    P_U = forget_projector(X_U)
    M_U = unlearning_operator(X_U, eta)
    pu = P_U @ delta0
    pu_norm = float(np.linalg.norm(pu))
    if pu_norm == 0.0:
        raise ValueError(
            "P_U Delta_0 = 0: the two orders agree on the forget row space, Theorem 3.1 is vacuous"
        )
    perp_norm = float(np.linalg.norm(delta0 - pu))
    sigma = smallest_nonzero_singular_value(X_test @ P_U)
    C0 = float(np.linalg.norm(X_test, 2)) * perp_norm
    rho = rho_star(delta0, M_U, P_U)
    return TheoremQuantities(rho, sigma, C0, onset_step(C0, sigma, pu_norm, rho), pu_norm, perp_norm)


# ---- one random instance -----------------------------------------------------------------------------------
def _check_matrix(name: str, X: Array, rows: int | None, d: int) -> None:
    if X.ndim != 2 or X.shape[1] != d or (rows is not None and X.shape[0] != rows):
        want = f"({rows if rows is not None else 'n'}, {d})"
        raise ValueError(f"{name} has shape {X.shape}, expected {want}")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{name} has non-finite entries")


@dataclass(frozen=True)
class Instance:
    """Two stages, a forget set and a test design: one draw of the Section 3 setting; validated."""

    X_A: Array
    y_A: Array
    X_B: Array
    y_B: Array
    X_U: Array
    y_U: Array
    X_test: Array
    mu: float
    eta: float
    seed: int | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.X_U.ndim != 2:
            raise ValueError(f"X_U must be a (k, d) matrix, got shape {self.X_U.shape}")
        k, d = self.X_U.shape
        if k < 1:
            raise ValueError("the forget set X_U has no rows (need k >= 1)")
        if k > d:
            raise ValueError(
                f"k > d: X_U has k={k} rows in d={d} dimensions, so it cannot have full row rank"
            )
        for name, X, y in (
            ("X_A", self.X_A, self.y_A),
            ("X_B", self.X_B, self.y_B),
            ("X_U", self.X_U, self.y_U),
        ):
            _check_matrix(name, X, None, d)
            if X.shape[0] < 1:
                raise ValueError(f"{name} has no rows")
            if np.shape(y) != (X.shape[0],):
                raise ValueError(f"targets for {name} have shape {np.shape(y)}, expected ({X.shape[0]},)")
        _check_matrix("X_test", self.X_test, None, d)
        if not (math.isfinite(self.mu) and self.mu > 0):
            raise ValueError(f"mu must be a finite number > 0 (the proximal ridge needs it), got {self.mu}")
        if not (math.isfinite(self.eta) and self.eta > 0):
            raise ValueError(f"eta must be a finite number > 0 (the gradient-ascent step), got {self.eta}")
        rank = int(np.linalg.matrix_rank(self.X_U))
        if rank < k:
            raise ValueError(f"X_U is rank-deficient (rank {rank} < k={k}); Theorem 3.1 needs full row rank")
        if self.X_test.shape[0] < k:
            raise ValueError(
                f"m={self.X_test.shape[0]} test rows < k={k}: X_test P_U cannot have rank k, "
                "so the sigma_U bound does not apply"
            )

    # sizes --------------------------------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return self.X_U.shape[1]

    @property
    def k(self) -> int:
        return self.X_U.shape[0]

    @property
    def m(self) -> int:
        return self.X_test.shape[0]

    @property
    def overparameterized(self) -> bool:
        return self.d > self.X_A.shape[0] + self.X_B.shape[0] + self.k

    # models -------------------------------------------------------------------------------------------------
    @property
    def theta_ab(self) -> Array:
        return self._cached(
            "ab", lambda: train_path([(self.X_A, self.y_A), (self.X_B, self.y_B)], self.mu, self.d)
        )

    @property
    def theta_ba(self) -> Array:
        return self._cached(
            "ba", lambda: train_path([(self.X_B, self.y_B), (self.X_A, self.y_A)], self.mu, self.d)
        )

    @property
    def delta0(self) -> Array:
        return self.theta_ab - self.theta_ba

    @property
    def M_U(self) -> Array:
        return self._cached("M", lambda: unlearning_operator(self.X_U, self.eta))

    @property
    def P_U(self) -> Array:
        return self._cached("P", lambda: forget_projector(self.X_U))

    def theorem(self) -> TheoremQuantities:
        return self._cached("thm", lambda: theorem_quantities(self.delta0, self.X_U, self.X_test, self.eta))

    def unlearn(self, theta: Array, steps: int) -> Array:
        return ga_trajectory(theta, self.X_U, self.y_U, self.eta, steps)

    def divergence(self, steps: int) -> Array:
        """d(theta_AB(t), theta_BA(t)) for t = 0..steps from the two GA trajectories (no closed form)."""
        return re_distance(
            self.X_test, self.unlearn(self.theta_ab, steps), self.unlearn(self.theta_ba, steps)
        )

    def bound(self, steps: int) -> Array:
        q = self.theorem()
        return bound_curve(q.sigma_U, q.pu_delta_norm, q.rho_star, self.m, steps)

    def _cached(self, key: str, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


# params: one instance is exactly the grid cell (d, n_a, n_b, k, m, mu, eta) and a seed, named as in the paper
def make_instance(d: int, n_a: int, n_b: int, k: int, m: int, mu: float, eta: float, seed: int) -> Instance:
    """Draw X_A, X_B, X_U, X_test with N(0, 1/d) entries and N(0, 1) targets (continuous, so generic)."""
    for name, v in (("d", d), ("n_a", n_a), ("n_b", n_b), ("k", k), ("m", m)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if k > d:
        raise ValueError(f"k > d: a forget set of k={k} rows in d={d} dimensions cannot have full row rank")
    rng = np.random.default_rng(seed)
    scale = 1.0 / math.sqrt(d)

    def draw(rows: int) -> Array:
        return rng.normal(scale=scale, size=(rows, d))

    X_A, X_B, X_U, X_test = draw(n_a), draw(n_b), draw(k), draw(m)
    y_A, y_B, y_U = rng.normal(size=n_a), rng.normal(size=n_b), rng.normal(size=k)
    return Instance(X_A, y_A, X_B, y_B, X_U, y_U, X_test, float(mu), float(eta), seed)


def bound_check(divergence: Array, bound: Array, t0: int, rtol: float = 1e-9) -> tuple[bool, int]:
    """(holds for every t >= max(t0, 0) up to rounding, how many steps were checked; 0 = vacuous horizon)."""
    start = max(t0, 0)
    if start >= len(divergence):
        return True, 0
    div, bnd = divergence[start:], bound[start:]
    return bool(np.all(div >= bnd * (1.0 - rtol))), int(len(div))
