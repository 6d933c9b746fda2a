"""The one definition of a path "gap" and its "growth rate", shared by the LLM analysis and the theory module.

gap(t)        = |a(t) - b(t)| for two scalar trajectories (for vector predictions use a mean squared distance
                computed by the caller, then treat it as the gap trajectory).
growth rate   = slope of log(gap) against t by least squares, with its R^2; the empirical counterpart of
                log(1 + rho*) in Theorem 3.1 when the gap is a squared distance (then slope ~ 2 log(1 + rho*)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-12


def gap(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))


@dataclass(frozen=True)
class Growth:
    rate: float  # d log(gap) / d step
    intercept: float
    r2: float
    n: int


def growth_rate(steps, gaps, min_points: int = 3) -> Growth:
    """Least-squares fit of log(gap) = intercept + rate * step over points with gap > EPS."""
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray(gaps, dtype=np.float64)
    keep = np.isfinite(g) & (g > EPS) & np.isfinite(t)
    t, y = t[keep], np.log(g[keep])
    if len(t) < min_points or np.ptp(t) == 0:
        return Growth(float("nan"), float("nan"), float("nan"), int(len(t)))
    rate, intercept = np.polyfit(t, y, 1)
    resid = y - (intercept + rate * t)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return Growth(float(rate), float(intercept), r2, int(len(t)))
