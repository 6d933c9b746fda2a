"""Path dependence, measured: how far apart the orders drift, whether the drift grows, and the recency effect.

A *cell* is everything that should not matter for Retrain Equivalence held fixed: (model, algorithm, lr, beta,
scheduler, seed). Inside a cell the only thing that differs between runs is the order of the finetuning stages
(equivalently p, the position of the forget stage U), so any gap between their curves is path dependence.
All inputs are the tidy frame of `load.load_metrics`; all outputs are polars frames. Gap and growth rate come
from `gaps.py`, the definition shared with the theory module.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl

from reteq import tracking as T
from reteq.analysis.gaps import gap, growth_rate
from reteq.analysis.student_t import t_ppf

CELL = ["model", "algorithm", "lr", "params", "scheduler", "seed"]
SETTING = ["model", "algorithm", "lr", "params", "scheduler"]  # a cell without its seed
GROWS_R2 = 0.8  # a fitted rate counts as "exponential growth" only when the log-linear fit explains this much


def primary_forget_metric(metrics: pl.DataFrame) -> str | None:
    """The curve the paper plots in Figure 1 (the unlearn label), else the closest one that was logged."""
    present = set(metrics["metric"].unique().to_list()) if metrics.height else set()
    for key in (T.M_FORGET_LABEL, T.M_FORGET_ALL, T.M_FORGET_PARAPHRASE, T.M_FORGET_SCORE):
        if key in present:
            return key
    return None


def path_divergence(
    metrics: pl.DataFrame, metric_names: tuple[str, ...] | None = T.EVAL_METRICS
) -> pl.DataFrame:
    """Per cell, metric and step: how far apart the orders are.

    max_gap(t)  = max over pairs of orders (a, b) of gaps.gap(a(t), b(t)) -- the largest pairwise gap.
    spread(t)   = max over orders of value(t) - min over orders of value(t).
    mean_gap(t) = mean over pairs of the same pairwise gap (a less extreme summary).
    For a scalar metric max_gap equals spread; both are kept because max_gap is the shared gap definition
    (a vector metric would make them differ) and spread is what a reader checks by eye on Figure 1.
    Steps where fewer than two orders logged a value are dropped. Repeated runs of one order are averaged.
    By default only the evaluation metrics (tracking.EVAL_METRICS) are compared; None compares every metric.
    """
    df = metrics.drop_nulls("value").filter(pl.col("value").is_finite())
    if metric_names is not None:
        df = df.filter(pl.col("metric").is_in(list(metric_names)))
    index = [*CELL, "metric", "step"]
    if not df.height:
        return _empty_divergence(df.schema)
    # one wide table for all cells at once: a column per order (prefixed so no order can shadow an index name)
    wide = df.with_columns(order=pl.lit("order:") + pl.col("order").fill_null("?")).pivot(
        on="order", index=index, values="value", aggregate_function="mean"
    )
    orders = [c for c in wide.columns if c not in index]
    values = wide.select(orders).to_numpy().astype(np.float64)
    if len(orders) < 2:
        return _empty_divergence(df.schema)
    with np.errstate(all="ignore"):
        pair_gaps = np.column_stack(
            [gap(values[:, i], values[:, j]) for i, j in itertools.combinations(range(len(orders)), 2)]
        )
        stats = {
            "n_orders": np.isfinite(values).sum(axis=1).astype(np.int64),
            "max_gap": _nan_reduce(np.nanmax, pair_gaps),
            "spread": _nan_reduce(np.nanmax, values) - _nan_reduce(np.nanmin, values),
            "mean_gap": _nan_reduce(np.nanmean, pair_gaps),
        }
    out = wide.select(index).with_columns(**{k: pl.Series(v) for k, v in stats.items()})
    return out.filter(pl.col("n_orders") >= 2).sort(index, nulls_last=True)


def _nan_reduce(fn, a: np.ndarray) -> np.ndarray:
    """Row-wise reduction that yields NaN (not a warning) for all-NaN rows."""
    out = np.full(a.shape[0], np.nan)
    ok = np.isfinite(a).any(axis=1)
    out[ok] = fn(a[ok], axis=1)
    return out


def _empty_divergence(schema) -> pl.DataFrame:
    cols = {c: schema[c] for c in [*CELL, "metric"]}
    cols.update(step=pl.Int64, n_orders=pl.Int64, max_gap=pl.Float64, spread=pl.Float64, mean_gap=pl.Float64)
    return pl.DataFrame(schema=cols)


def growth_rates(divergence: pl.DataFrame) -> pl.DataFrame:
    """Per cell and metric: the exponential growth rate of max_gap over unlearning steps.

    rate = slope of log(max_gap) against step (least squares, `gaps.growth_rate`), with intercept and R^2;
    rate > 0 with a high R^2 is the empirical signature of Theorem 3.1 (gaps grow like (1 + rho*)^t).
    `grows` is rate > 0 and R^2 >= GROWS_R2.
    """
    rows = []
    for part in divergence.sort("step").partition_by([*CELL, "metric"], maintain_order=True):
        fit = growth_rate(part["step"].to_numpy(), part["max_gap"].to_numpy())
        keys = part.row(0, named=True)
        rows.append(
            {
                **{c: keys[c] for c in [*CELL, "metric"]},
                "rate": fit.rate,
                "intercept": fit.intercept,
                "r2": fit.r2,
                "n_points": fit.n,
                "grows": bool(fit.rate > 0 and fit.r2 >= GROWS_R2),
            }
        )
    schema = {c: divergence.schema[c] for c in [*CELL, "metric"]}
    schema.update(rate=pl.Float64, intercept=pl.Float64, r2=pl.Float64, n_points=pl.Int64, grows=pl.Boolean)
    return pl.DataFrame(rows, schema=schema, orient="row").sort([*CELL, "metric"], nulls_last=True)


def growth_summary(growth: pl.DataFrame, metric: str) -> dict:
    """Share of cells whose gap in `metric` grows (rate > 0, R^2 >= GROWS_R2), with median rate and R^2."""
    g = growth.filter((pl.col("metric") == metric) & pl.col("rate").is_not_nan())
    n = g.height
    return {
        "metric": metric,
        "n_cells": n,
        "n_growing": int(g["grows"].sum()) if n else 0,
        "share": float(g["grows"].mean()) if n else math.nan,
        "median_rate": float(g["rate"].median()) if n else math.nan,
        "median_r2": float(g["r2"].median()) if n else math.nan,
    }


def forget_scores(metrics: pl.DataFrame) -> tuple[pl.DataFrame, str | None]:
    """Forget score per run and step, and where it came from.

    The logged `forget/score` (all_logp(0) - all_logp(t)) when present; otherwise it is derived the same way
    from `forget/all_logp` (first logged step as the reference). Higher = more forgetting.
    """
    logged = metrics.filter((pl.col("metric") == T.M_FORGET_SCORE) & pl.col("value").is_not_null())
    if logged.height:
        return logged, T.M_FORGET_SCORE
    base = metrics.filter((pl.col("metric") == T.M_FORGET_ALL) & pl.col("value").is_not_null()).sort("step")
    if not base.height:
        return base, None
    derived = base.with_columns(
        value=pl.col("value").first().over("run_id") - pl.col("value"), metric=pl.lit(T.M_FORGET_SCORE)
    )
    return derived, f"{T.M_FORGET_SCORE} (derived from {T.M_FORGET_ALL})"


def final_values(metrics: pl.DataFrame) -> pl.DataFrame:
    """Each run's value of each metric at its last logged step (a collapsed run stops early)."""
    return metrics.drop_nulls("value").sort("step").group_by("run_id", "metric", maintain_order=True).last()


def recency(metrics: pl.DataFrame) -> pl.DataFrame:
    """Per cell: where the order that learned U last (largest p; p = 4 in the paper) ranks by forget score.

    rank_of_last = 1 + number of other orders whose final forget score is strictly lower, so rank 1 means
    the last-learned order forgets least (the recency effect); `last_is_slowest` is rank_of_last == 1
    (ties at the minimum count as slowest). Cells with fewer than two orders are left out.
    """
    scores, _ = forget_scores(metrics)
    final = (
        final_values(scores).group_by([*CELL, "p"]).agg(pl.col("value").mean().alias("score")).drop_nulls("p")
    )
    rows = []
    for part in final.partition_by(CELL, maintain_order=True):
        if part.height < 2:
            continue
        last = part.sort("p")[-1]
        last_score = last["score"][0]
        rank = 1 + int((part["score"] < last_score).sum())
        keys = part.row(0, named=True)
        rows.append(
            {
                **{c: keys[c] for c in CELL},
                "n_orders": part.height,
                "last_p": last["p"][0],
                "last_score": last_score,
                "min_score": part["score"].min(),
                "max_score": part["score"].max(),
                "rank_of_last": rank,
                "last_is_slowest": rank == 1,
            }
        )
    schema = {c: metrics.schema[c] for c in CELL}
    schema.update(
        n_orders=pl.Int64,
        last_p=pl.Int64,
        last_score=pl.Float64,
        min_score=pl.Float64,
        max_score=pl.Float64,
        rank_of_last=pl.Int64,
        last_is_slowest=pl.Boolean,
    )
    return pl.DataFrame(rows, schema=schema, orient="row").sort(CELL, nulls_last=True)


def recency_summary(rec: pl.DataFrame) -> dict:
    """How many cells show the recency effect (the last-learned order forgets least), and their share."""
    n = rec.height
    k = int(rec["last_is_slowest"].sum()) if n else 0
    return {"n_cells": n, "n_slowest": k, "share": k / n if n else math.nan}


def recency_over_seeds(metrics: pl.DataFrame, confidence: float = 0.95) -> pl.DataFrame:
    """Per setting (a cell without its seed): the final forget score of each order as a seed mean with a
    Student-t interval, and whether the order that learned U last forgets least on the mean
    (`last_is_slowest`) and with its whole interval below every other order's (`last_is_separated`; null with
    one seed). Settings with fewer than two orders are left out."""
    scores, _ = forget_scores(metrics)
    final = final_values(scores).drop_nulls("p").filter(pl.col("value").is_finite())
    per_p = final.group_by([*SETTING, "p"]).agg(
        n=pl.col("seed").n_unique().cast(pl.Int64), mean=pl.col("value").mean(), std=pl.col("value").std(ddof=1))
    quantile = t_quantiles(per_p["n"].unique().to_list(), confidence)
    rows = []
    for part in per_p.partition_by(SETTING, maintain_order=True):
        if part.height < 2:
            continue
        part = part.sort("p")
        half = [quantile.get(n, math.nan) * (sd if sd is not None else math.nan) / math.sqrt(n)
                for n, sd in zip(part["n"].to_list(), part["std"].to_list())]
        means = part["mean"].to_list()
        lo = [m - h for m, h in zip(means, half)]
        hi = [m + h for m, h in zip(means, half)]
        last, others = len(means) - 1, range(len(means) - 1)
        separated = None if any(math.isnan(h) for h in half) else all(hi[last] < lo[i] for i in others)
        keys = part.row(0, named=True)
        rows.append({**{c: keys[c] for c in SETTING}, "n_seeds": int(part["n"].min()), "last_p": part["p"][-1],
                     "last_mean": means[last], "last_ci_low": lo[last], "last_ci_high": hi[last],
                     "others_min_ci_low": min(lo[i] for i in others), "others_min_mean": min(means[i] for i in others),
                     "last_is_slowest": all(means[last] < means[i] for i in others),
                     "last_is_separated": separated})
    schema = {c: metrics.schema[c] for c in SETTING}
    schema.update(n_seeds=pl.Int64, last_p=pl.Int64, last_mean=pl.Float64, last_ci_low=pl.Float64,
                  last_ci_high=pl.Float64, others_min_ci_low=pl.Float64, others_min_mean=pl.Float64,
                  last_is_slowest=pl.Boolean, last_is_separated=pl.Boolean)
    return pl.DataFrame(rows, schema=schema)


def t_quantiles(ns: list[int], confidence: float) -> dict[int, float]:
    """Student-t quantile for each sample size n >= 2 (the interval's half-width is q * std / sqrt(n))."""
    return {n: t_ppf((1 + confidence) / 2, n - 1) for n in ns if n and n >= 2}


def seed_summary(metrics: pl.DataFrame, confidence: float = 0.95) -> pl.DataFrame:
    """Across seeds, per (setting, order, metric, step): n, mean, sample std and a t-interval for the mean.

    ci = mean -+ t_{(1+confidence)/2, n-1} * std / sqrt(n) (Student t, since seeds are few); null when n < 2.
    """
    df = metrics.drop_nulls("value").filter(pl.col("value").is_finite())
    out = df.group_by([*SETTING, "order", "p", "metric", "step"]).agg(
        n=pl.col("seed").n_unique().cast(pl.Int64),
        mean=pl.col("value").mean(),
        std=pl.col("value").std(ddof=1),
    )
    quantile = t_quantiles(out["n"].unique().to_list(), confidence)
    t_q = pl.col("n").replace_strict(quantile, default=None, return_dtype=pl.Float64)
    half = t_q * pl.col("std") / pl.col("n").cast(pl.Float64).sqrt()
    return out.with_columns(ci_low=pl.col("mean") - half, ci_high=pl.col("mean") + half).sort(
        [*SETTING, "p", "metric", "step"], nulls_last=True
    )
