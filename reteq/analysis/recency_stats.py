"""The recency effect as statistics over seeds: intervals per p, paired tests of the last p, equal forgetting.

Input is `leaves` (reteq.analysis.leaves.leaves_table): one row per unlearning leaf with its final forget score.
A *setting* is (model, method, lr, params, scheduler): everything but the seed and the order. Per setting:

- per p: the seed mean of the final forget score with a two-sided 95% Student-t interval,
  mean -+ t_{0.975, n-1} * sd / sqrt(n) (sd with ddof = 1); none with one seed;
- whether the last-learned order (largest p; p = 4 in the paper) has the lowest mean;
- a paired comparison of the last p against each other p over the seeds both have (paired by seed, because the
  seed fixes the stage data order, the adapter's initialisation and the unlearning batches of every p alike):
  d_s = score(last p, seed s) - score(other p, seed s);
  * paired t-test, two-sided: t = mean(d) / (sd(d) / sqrt(n)), df = n - 1;
  * exact sign-flip permutation test, two-sided: under H0 each d_s is as likely to have either sign, so the
    p-value is the share of the 2^n sign assignments whose |sum| is at least the observed |sum d| (the
    observed one included). It assumes no normality, but its smallest attainable value is 2 / 2^n:
    0.0625 with 5 seeds, 0.031 with 6.
  The p-values are per comparison, not corrected for the (number of p - 1) comparisons of a setting.

Recency at equal forgetting: the same forget score can need a different lr for each order, so comparing orders
at one lr mixes "forgets slower" with "needs a larger step". Per (model, method, params, scheduler), the lr at
which the first order (smallest p) reaches a fixed forget score is found by linear interpolation of its seed-mean
score in log(lr) between the two neighbouring swept lrs (the first crossing from below as lr grows); every other
order's seed mean is interpolated at that same log(lr). No extrapolation: an order that never reaches the target
inside the swept lrs, or is above it at the smallest one, gets no lr and a reason.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl

from reteq.analysis.student_t import t_ppf, t_sf_two_sided

SETTING = ["model", "method", "lr", "params", "scheduler"]
CURVE = ["model", "method", "params", "scheduler"]  # a setting without its lr: one forget-score-vs-lr curve
CONFIDENCE = 0.95
EQUAL_FORGETTING_TARGET = 1.0  # nats/token: the forget score at which orders are compared (Table 1's scale)
EXACT_SIGN_FLIP_MAX_N = 20  # 2^20 assignments enumerated; beyond, the permutation p-value is left empty
SCORE = "forget_score"


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(mean, sd, half-width, t quantile) of the mean's two-sided Student-t interval; NaN widths for n < 2."""
    x = np.asarray(values, dtype=float)
    n = x.size
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(x.std(ddof=1))
    q = t_ppf((1 + confidence) / 2, n - 1)
    return mean, sd, q * sd / math.sqrt(n), q


def paired_t(diffs: list[float]) -> tuple[float, float]:
    """(t statistic, two-sided p-value) of the paired t-test on d = a - b; NaN for n < 2 or zero spread."""
    d = np.asarray(diffs, dtype=float)
    n = d.size
    if n < 2:
        return math.nan, math.nan
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        mean = float(d.mean())
        return (math.copysign(math.inf, mean), 0.0) if mean else (math.nan, math.nan)
    t = float(d.mean()) / (sd / math.sqrt(n))
    return t, t_sf_two_sided(t, n - 1)


def sign_flip_p(diffs: list[float], max_n: int = EXACT_SIGN_FLIP_MAX_N) -> float:
    """Exact two-sided sign-flip permutation p-value of H0 'd is symmetric about 0': the share of the 2^n sign
    assignments with |sum(s * d)| >= |sum(d)|. NaN when n = 0 or n > max_n."""
    d = np.asarray(diffs, dtype=float)
    n = d.size
    if n == 0 or n > max_n:
        return math.nan
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    sums = np.abs(signs @ d)
    observed = abs(float(d.sum()))
    return float(np.count_nonzero(sums >= observed - 1e-12 * max(1.0, observed))) / len(signs)


def _final(leaves: pl.DataFrame) -> pl.DataFrame:
    return leaves.filter(pl.col(SCORE).is_not_null() & pl.col(SCORE).is_finite() & pl.col("p").is_not_null())


def per_p_intervals(leaves: pl.DataFrame, confidence: float = CONFIDENCE) -> pl.DataFrame:
    """Per setting and p: n seeds, mean, sd, t quantile and the interval of the final forget score."""
    rows = []
    for part in _final(leaves).partition_by([*SETTING, "p"], maintain_order=True):
        mean, sd, half, q = t_interval(part[SCORE].to_list(), confidence)
        keys = part.row(0, named=True)
        rows.append({**{c: keys[c] for c in [*SETTING, "p"]}, "n_seeds": part["seed"].n_unique(), "mean": mean,
                     "sd": sd, "t_quantile": q, "ci_low": mean - half, "ci_high": mean + half})
    schema = {**{c: leaves.schema[c] for c in [*SETTING, "p"]}, "n_seeds": pl.Int64, "mean": pl.Float64,
              "sd": pl.Float64, "t_quantile": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64}
    return _nan_to_null(pl.DataFrame(rows, schema=schema, orient="row").sort([*SETTING, "p"], nulls_last=True))


def recency_tests(leaves: pl.DataFrame, confidence: float = CONFIDENCE) -> pl.DataFrame:
    """Per setting and other p: the last p against it, paired by seed (see the module docstring).

    Columns: the setting, last_p, other_p, n_pairs, the two means over the paired seeds, mean_diff (last - other;
    negative = the last-learned order forgot less), its interval, t, t_pvalue, signflip_pvalue, and per setting
    last_is_lowest (the last p's mean over all its seeds is below every other p's) and last_below_all (every
    paired mean_diff < 0 with t_pvalue < 1 - confidence)."""
    final = _final(leaves)
    rows = []
    for part in final.partition_by(SETTING, maintain_order=True):
        ps = sorted(set(part["p"].to_list()))
        if len(ps) < 2:
            continue
        last = ps[-1]
        means = {p: float(part.filter(pl.col("p") == p)[SCORE].mean()) for p in ps}
        by_seed = {p: dict(zip(*part.filter(pl.col("p") == p).group_by("seed").agg(pl.col(SCORE).mean())
                               .sort("seed").get_columns())) for p in ps}
        lowest = all(means[last] < means[p] for p in ps[:-1])
        keys = part.row(0, named=True)
        group = []
        for other in ps[:-1]:
            seeds = sorted(set(by_seed[last]) & set(by_seed[other]))
            a = [by_seed[last][s] for s in seeds]
            b = [by_seed[other][s] for s in seeds]
            d = [x - y for x, y in zip(a, b)]
            mean_d, _, half, _ = t_interval(d, confidence)
            t, p_t = paired_t(d)
            group.append({**{c: keys[c] for c in SETTING}, "last_p": last, "other_p": other, "n_pairs": len(seeds),
                          "last_mean": float(np.mean(a)) if a else math.nan,
                          "other_mean": float(np.mean(b)) if b else math.nan,
                          "mean_diff": mean_d, "diff_ci_low": mean_d - half, "diff_ci_high": mean_d + half,
                          "t": t, "t_pvalue": p_t, "signflip_pvalue": sign_flip_p(d), "last_is_lowest": lowest})
        below = all(r["mean_diff"] < 0 and r["t_pvalue"] < 1 - confidence for r in group)
        rows += [{**r, "last_below_all": below} for r in group]
    schema = {**{c: leaves.schema[c] for c in SETTING}, "last_p": pl.Int64, "other_p": pl.Int64,
              "n_pairs": pl.Int64, "last_mean": pl.Float64, "other_mean": pl.Float64, "mean_diff": pl.Float64,
              "diff_ci_low": pl.Float64, "diff_ci_high": pl.Float64, "t": pl.Float64, "t_pvalue": pl.Float64,
              "signflip_pvalue": pl.Float64, "last_is_lowest": pl.Boolean, "last_below_all": pl.Boolean}
    return _nan_to_null(pl.DataFrame(rows, schema=schema, orient="row").sort([*SETTING, "other_p"], nulls_last=True))


def interpolate_log_lr(lrs: list[float], values: list[float], target: float) -> tuple[float | None, str]:
    """The lr at which `values` (ordered by increasing lr) first reaches `target` from below, linearly in log(lr)
    between the two neighbouring swept lrs; (None, reason) when the swept lrs do not bracket it."""
    pairs = [(lr, v) for lr, v in zip(lrs, values) if v is not None and math.isfinite(v) and lr > 0]
    if len(pairs) < 1:
        return None, "no score"
    if pairs[0][1] >= target:
        if pairs[0][1] == target:
            return pairs[0][0], "reached at a swept lr"
        return None, f"already above the target at the smallest lr ({pairs[0][1]:.3g} at {pairs[0][0]:.3g})"
    for (lr0, v0), (lr1, v1) in zip(pairs, pairs[1:]):
        if v0 < target <= v1:
            frac = (target - v0) / (v1 - v0)
            return math.exp(math.log(lr0) + frac * (math.log(lr1) - math.log(lr0))), "interpolated in log(lr)"
    best = max(pairs, key=lambda x: x[1])
    return None, f"not reached in the swept lrs (max {best[1]:.3g} at lr {best[0]:.3g})"


def value_at_log_lr(lrs: list[float], values: list[float], lr: float) -> float | None:
    """`values` linearly interpolated in log(lr) at `lr` (inside the swept range only; None outside or missing)."""
    pairs = [(x, v) for x, v in zip(lrs, values) if v is not None and math.isfinite(v) and x > 0]
    for (lr0, v0), (lr1, v1) in zip(pairs, pairs[1:]):
        if lr0 <= lr <= lr1:
            if lr1 == lr0:
                return v0
            frac = (math.log(lr) - math.log(lr0)) / (math.log(lr1) - math.log(lr0))
            return v0 + frac * (v1 - v0)
    if len(pairs) == 1 and pairs[0][0] == lr:
        return pairs[0][1]
    return None


def equal_forgetting(leaves: pl.DataFrame, target: float = EQUAL_FORGETTING_TARGET) -> pl.DataFrame:
    """Per curve (model, method, params, scheduler): the lr at which the first p's seed-mean forget score reaches
    `target`, and every p's seed-mean score at that lr (interpolated in log(lr)); whether the last p is lowest
    there and its gap to the target (negative = forgets less at equal forgetting of the first p)."""
    means = _final(leaves).group_by([*CURVE, "lr", "p"]).agg(pl.col(SCORE).mean().alias("mean"))
    ps_all = sorted(set(means["p"].to_list()))
    rows = []
    for part in means.partition_by(CURVE, maintain_order=True):
        ps = sorted(set(part["p"].to_list()))
        lrs = sorted(set(part["lr"].to_list()))
        curves = {p: [_one(part.filter((pl.col("p") == p) & (pl.col("lr") == lr))["mean"]) for lr in lrs] for p in ps}
        first, last = ps[0], ps[-1]
        lr_star, how = interpolate_log_lr(lrs, curves[first], target)
        at = {p: (value_at_log_lr(lrs, curves[p], lr_star) if lr_star is not None else None) for p in ps}
        known = {p: v for p, v in at.items() if v is not None}
        lowest = (all(known[last] < v for p, v in known.items() if p != last)
                  if last in known and len(known) >= 2 else None)
        keys = part.row(0, named=True)
        rows.append({**{c: keys[c] for c in CURVE}, "target": target, "first_p": first, "last_p": last,
                     "n_lrs": len(lrs), "lr_min": lrs[0], "lr_max": lrs[-1], "lr_at_target": lr_star, "how": how,
                     **{f"score_p{p}": at.get(p) for p in ps_all},
                     "last_minus_target": (at[last] - target) if at.get(last) is not None else None,
                     "last_is_lowest": lowest})
    schema = {**{c: leaves.schema[c] for c in CURVE}, "target": pl.Float64, "first_p": pl.Int64, "last_p": pl.Int64,
              "n_lrs": pl.Int64, "lr_min": pl.Float64, "lr_max": pl.Float64, "lr_at_target": pl.Float64,
              "how": pl.String, **{f"score_p{p}": pl.Float64 for p in ps_all}, "last_minus_target": pl.Float64,
              "last_is_lowest": pl.Boolean}
    return pl.DataFrame(rows, schema=schema, orient="row").sort(CURVE, nulls_last=True)


def summary(tests: pl.DataFrame, intervals: pl.DataFrame, equal: pl.DataFrame, confidence: float = CONFIDENCE
            ) -> str:
    """One paragraph with the counts a reader checks first."""
    if not tests.height:
        return ("Recency statistics need two or more orders of one setting with a final forget score: none here.")
    per = tests.group_by(SETTING).agg(pl.col("last_is_lowest").first(), pl.col("last_below_all").first(),
                                      pl.col("n_pairs").min())
    n, lowest = per.height, int(per["last_is_lowest"].sum())
    below = int(per["last_below_all"].sum())
    n_min, n_max = int(per["n_pairs"].min()), int(per["n_pairs"].max())
    seeds = f"{n_min}" if n_min == n_max else f"{n_min}-{n_max}"
    floor = 2 / 2 ** n_min if n_min else math.nan
    alpha = 1 - confidence
    text = (f"Over {seeds} paired seeds per setting (model x method x lr x knobs x scheduler), the last-learned "
            f"order has the lowest seed-mean final forget score in {lowest} of {n} settings, and is below every "
            f"other order with a two-sided paired t-test p < {alpha:.2g} in {below} of {n}. The exact sign-flip "
            f"test cannot go below 2/2^n = {floor:.3g} with n = {n_min} seeds.")
    reached = equal.filter(pl.col("lr_at_target").is_not_null()) if equal.height else equal
    if equal.height:
        low = int(reached["last_is_lowest"].fill_null(False).sum()) if reached.height else 0
        target = equal["target"][0]
        text += (f" At equal forgetting (the lr at which the first order reaches forget score {target:g}, "
                 f"interpolated in log(lr)): reached inside the swept lrs for {reached.height} of {equal.height} "
                 f"methods; the last-learned order is lowest there in {low} of {reached.height}.")
    return text


def _one(series: pl.Series) -> float | None:
    return float(series[0]) if series.len() else None


def _nan_to_null(frame: pl.DataFrame) -> pl.DataFrame:
    """NaN (no interval with one seed, no test with one pair) as null: an empty cell in the CSV, '–' on the page."""
    floats = [c for c, t in frame.schema.items() if t == pl.Float64]
    return frame.with_columns(pl.col(c).fill_nan(None) for c in floats)
