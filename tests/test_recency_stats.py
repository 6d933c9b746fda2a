"""The recency statistics against values computed by hand: Student t by its closed forms, a t-interval, a paired
t statistic, sign-flip p-values enumerated over every sign assignment, log(lr) interpolation; then the tables on a
hand-made leaves frame whose every number is derived in the comments."""

from __future__ import annotations

import math

import polars as pl
import pytest

from reteq.analysis import recency_stats as R
from reteq.analysis.student_t import t_cdf, t_ppf, t_sf_two_sided

T_975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)) solved for F = 0.975
T_975_DF1 = math.tan(math.pi * 0.475)  # df = 1 (Cauchy): F(t) = 1/2 + atan(t) / pi


def test_student_t_matches_its_closed_forms():
    for t in (-30.0, -2.5, -0.3, 0.0, 0.7, 4.0, 100.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
        assert t_sf_two_sided(t, 2) == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), abs=1e-13)
    assert t_ppf(0.975, 1) == pytest.approx(T_975_DF1, rel=1e-12)
    assert t_ppf(0.975, 2) == pytest.approx(T_975_DF2, rel=1e-12)
    assert t_ppf(0.025, 2) == pytest.approx(-T_975_DF2, rel=1e-12)
    assert t_ppf(0.975, 4) == pytest.approx(2.7764451051977987, rel=1e-12)  # printed t tables: 2.776
    assert t_ppf(0.975, 1e7) == pytest.approx(1.959963984540054, rel=1e-6)  # the normal limit
    assert t_sf_two_sided(1e6, 3) < 1e-15 and t_sf_two_sided(0.0, 3) == pytest.approx(1.0)


def test_t_interval_and_paired_t_by_hand():
    # [1, 2, 6]: mean 3, deviations -2, -1, 3, sd = sqrt((4 + 1 + 9) / 2) = sqrt(7)
    mean, sd, half, q = R.t_interval([1.0, 2.0, 6.0])
    assert (mean, sd, q) == (pytest.approx(3.0), pytest.approx(math.sqrt(7)), pytest.approx(T_975_DF2))
    assert half == pytest.approx(T_975_DF2 * math.sqrt(7) / math.sqrt(3))
    assert math.isnan(R.t_interval([2.0])[2])  # one seed: no interval
    # d = [-1, -2, 0]: mean -1, sd 1, t = -1 / (1 / sqrt 3) = -sqrt 3; df 2: p = 1 - sqrt3 / sqrt(2 + 3)
    t, p = R.paired_t([-1.0, -2.0, 0.0])
    assert t == pytest.approx(-math.sqrt(3)) and p == pytest.approx(1 - math.sqrt(3) / math.sqrt(5))


def test_sign_flip_p_enumerated_by_hand():
    # d = (-3, -2, 1), |sum| = 4; the 8 sign assignments give sums -4 -6 0 -2 2 0 6 4: four have |sum| >= 4
    assert R.sign_flip_p([-3.0, -2.0, 1.0]) == pytest.approx(4 / 8)
    # d = (-1, -2, -3): sums 6 0 2 -4 4 -2 0 -6, |sum| >= 6 twice: the floor 2 / 2^n
    assert R.sign_flip_p([-1.0, -2.0, -3.0]) == pytest.approx(2 / 8)
    assert R.sign_flip_p([-1.0] * 5) == pytest.approx(2 / 32)  # five seeds can never reach 0.05
    assert math.isnan(R.sign_flip_p([])) and math.isnan(R.sign_flip_p([1.0] * 3, max_n=2))


def test_log_lr_interpolation():
    lrs = [1e-4, 3e-4, 1e-3]
    lr, how = R.interpolate_log_lr(lrs, [0.5, 1.5, 4.0], 1.0)  # halfway between 0.5 and 1.5: the geometric mean
    assert lr == pytest.approx(math.sqrt(1e-4 * 3e-4)) and how == "interpolated in log(lr)"
    assert R.value_at_log_lr(lrs, [0.1, 0.3, 2.0], lr) == pytest.approx(0.2)
    assert R.interpolate_log_lr(lrs, [0.5, 1.5, 4.0], 0.5) == (1e-4, "reached at a swept lr")
    none, why = R.interpolate_log_lr(lrs, [0.5, 1.5, 4.0], 5.0)
    assert none is None and why.startswith("not reached")
    none, why = R.interpolate_log_lr(lrs, [0.5, 1.5, 4.0], 0.2)
    assert none is None and why.startswith("already above")
    assert R.value_at_log_lr(lrs, [0.1, 0.3, 2.0], 2e-3) is None  # no extrapolation


def _leaves() -> pl.DataFrame:
    """GA at two lrs, 3 seeds, p = 1..4. At lr 1e-4 the final forget scores are
        p=1: 1.0 1.2 0.8 (mean 1.0)   p=2: 0.9 1.1 1.0   p=3: 0.7 0.9 0.8   p=4: 0.1 0.2 0.6 (mean 0.3)
    and at lr 1e-3 each score is x 3. Seed 2's p = 4 has no math metric (empty cells are allowed)."""
    base = {1: [1.0, 1.2, 0.8], 2: [0.9, 1.1, 1.0], 3: [0.7, 0.9, 0.8], 4: [0.1, 0.2, 0.6]}
    rows = [{"model": "m", "method": "ga", "lr": lr, "params": None, "scheduler": "wsd", "p": p, "seed": s,
             "forget_score": v * k, "math_acc_start": None if (p, s) == (4, 2) else 0.5}
            for lr, k in ((1e-4, 1.0), (1e-3, 3.0)) for p, vs in base.items() for s, v in enumerate(vs)]
    return pl.DataFrame(rows)


def test_tables_on_a_hand_made_leaves_frame():
    leaves = _leaves()
    intervals = R.per_p_intervals(leaves)
    row = intervals.filter((pl.col("lr") == 1e-4) & (pl.col("p") == 4)).row(0, named=True)
    # p = 4 at 1e-4: [0.1, 0.2, 0.6], mean 0.3, deviations -0.2 -0.1 0.3, sd = sqrt(0.14 / 2)
    assert row["n_seeds"] == 3 and row["mean"] == pytest.approx(0.3) and row["sd"] == pytest.approx(math.sqrt(0.07))
    assert row["ci_high"] - row["mean"] == pytest.approx(T_975_DF2 * math.sqrt(0.07 / 3))

    tests = R.recency_tests(leaves)
    assert tests.height == 2 * 3 and tests["last_p"].unique().to_list() == [4]
    vs1 = tests.filter((pl.col("lr") == 1e-4) & (pl.col("other_p") == 1)).row(0, named=True)
    # d = p4 - p1 = (-0.9, -1.0, -0.2): mean -0.7, deviations -0.2 -0.3 0.5, sd = sqrt(0.38 / 2)
    sd = math.sqrt(0.19)
    assert vs1["n_pairs"] == 3 and vs1["mean_diff"] == pytest.approx(-0.7)
    assert vs1["t"] == pytest.approx(-0.7 / (sd / math.sqrt(3)))
    t = vs1["t"]
    assert vs1["t_pvalue"] == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t))  # df = 2 closed form
    assert vs1["signflip_pvalue"] == pytest.approx(2 / 8)  # all three d < 0: only all-minus and all-plus reach it
    assert tests["last_is_lowest"].all()
    assert not tests["last_below_all"].any()  # vs p = 3: d = (-0.6, -0.7, -0.2), t = -3.27, p = 0.08

    equal = R.equal_forgetting(leaves, target=1.5).row(0, named=True)
    # p = 1 means: 1.0 at 1e-4, 3.0 at 1e-3 -> 1.5 a quarter of the way in log(lr): lr = 1e-4 * 10^0.25
    assert equal["lr_at_target"] == pytest.approx(1e-4 * 10 ** 0.25)
    assert equal["score_p1"] == pytest.approx(1.5) and equal["score_p4"] == pytest.approx(0.3 + 0.25 * 0.6)
    assert equal["last_is_lowest"] and equal["last_minus_target"] == pytest.approx(0.45 - 1.5)
    assert "last-learned order has the lowest seed-mean final forget score in 2 of 2" in R.summary(
        tests, intervals, R.equal_forgetting(leaves, target=1.5))


def test_one_seed_and_one_order_give_empty_cells_not_errors():
    one = _leaves().filter(pl.col("seed") == 0)
    tests = R.recency_tests(one)
    assert tests["t"].null_count() == tests.height and tests["n_pairs"].to_list() == [1] * tests.height
    assert R.per_p_intervals(one)["ci_low"].null_count() == 8
    assert R.recency_tests(_leaves().filter(pl.col("p") == 1)).height == 0
    assert "none here" in R.summary(R.recency_tests(_leaves().filter(pl.col("p") == 1)), pl.DataFrame(),
                                    pl.DataFrame())
