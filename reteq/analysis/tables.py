"""Table 1 in the paper's layout: rows p = 1..4, one column per model x algorithm, values after the last step.

A sweep may hold several settings per (model, algorithm) -- an lr grid, a second scheduler, several seeds.
Seeds are averaged. The setting with the most runs is the *main* one (the paper's defaults in a paper
sweep): its column is labelled "model ALGO", exactly like the paper's, and gets the paper's number beside
it; any other setting gets its own column labelled by what differs ("model GA (lr=5e-05)").
"""

from __future__ import annotations

import polars as pl

from reteq import tracking as T
from reteq.analysis import divergence as D
from reteq.analysis import paper_numbers as paper
from reteq.analysis.divergence import SETTING, final_values, forget_scores

TABLE_FORGET = "Table 1: forget score"
TABLE_FORGET_CI = "Table 1: forget score, seed mean ± 95% interval"
TABLE_TOFU = "Table 1: TOFU utility"
TABLE_MATH = "Table 1: math utility"
TABLE_FINAL = "Final values per setting and p"
_ALGO_ORDER = {"ga": 0, "npo": 1, "simnpo": 2}


def derived_utility(metrics: pl.DataFrame, target: str) -> tuple[pl.DataFrame, str | None]:
    """A utility curve per run: the logged one, else derived from its raw metric like the writer would.

    utility/tofu = 1 - |tofu_logp(t) - tofu_logp(0)|;  utility/math = math_acc(t) - math_acc(0).
    Returns (frame, source description) or (empty, None) when neither was logged.
    """
    logged = metrics.filter((pl.col("metric") == target) & pl.col("value").is_not_null())
    if logged.height:
        return logged, target
    source = {T.M_TOFU_UTILITY: T.M_TOFU_LOGP, T.M_MATH_UTILITY: T.M_MATH_ACC}.get(target)
    raw = metrics.filter((pl.col("metric") == source) & pl.col("value").is_not_null()).sort("step")
    if source is None or not raw.height:
        return raw.clear(), None
    delta = pl.col("value") - pl.col("value").first().over("run_id")
    value = 1 - delta.abs() if target == T.M_TOFU_UTILITY else delta
    return raw.with_columns(value=value, metric=pl.lit(target)), f"{target} (derived from {source})"


def main_settings(metrics: pl.DataFrame) -> pl.DataFrame:
    """Per (model, algorithm): the (lr, beta, scheduler) with the most runs; ties go to the smallest lr."""
    counts = (
        metrics.group_by(SETTING)
        .agg(pl.col("run_id").n_unique().alias("runs"))
        .sort(["runs", "lr", "scheduler"], descending=[True, False, False], nulls_last=True)
    )
    return counts.group_by(["model", "algorithm"], maintain_order=True).first().drop("runs")


def restrict_to_main(metrics: pl.DataFrame) -> pl.DataFrame:
    """Only the runs of each (model, algorithm)'s main setting (what Figures 1, 3 and 5 show)."""
    if not metrics.height:
        return metrics
    return metrics.join(main_settings(metrics), on=SETTING, how="semi", nulls_equal=True)


def final_table(metrics: pl.DataFrame) -> pl.DataFrame:
    """Long form: per setting, p and metric, the seed-mean (and std) of each run's last logged value."""
    parts = [forget_scores(metrics)[0]]
    parts += [derived_utility(metrics, key)[0] for key in (T.M_TOFU_UTILITY, T.M_MATH_UTILITY)]
    parts = [p.select(metrics.columns) for p in parts if p.height]
    if not parts:
        return pl.DataFrame()
    final = final_values(pl.concat(parts))
    return (
        final.group_by([*SETTING, "p", "metric"])
        .agg(
            n_seeds=pl.col("seed").n_unique().cast(pl.Int64),
            mean=pl.col("value").mean(),
            std=pl.col("value").std(ddof=1),
            last_step=pl.col("step").max(),
        )
        .sort([*SETTING, "metric", "p"], nulls_last=True)
    )


def table1_intervals(metrics: pl.DataFrame, confidence: float = 0.95) -> pl.DataFrame | None:
    """Table 1's forget score as 'mean ± half-width (n)' per p and main setting: the seed mean with its Student-t
    interval. None when no setting has two or more seeds (one seed has no interval)."""
    final = final_table(metrics)
    if not final.height:
        return None
    final = final.filter(pl.col("metric") == T.M_FORGET_SCORE).join(main_settings(metrics), on=SETTING,
                                                                     how="semi", nulls_equal=True)
    if not final.height or final["n_seeds"].max() < 2:
        return None
    quantile = D.t_quantiles(final["n_seeds"].unique().to_list(), confidence)
    ps = sorted(p for p in final["p"].unique().to_list() if p is not None)
    columns: dict[str, list] = {"p": ps}
    for part in final.partition_by(SETTING, maintain_order=True):
        cells = {}
        for r in part.iter_rows(named=True):
            half = quantile.get(r["n_seeds"])
            cells[r["p"]] = (f"{r['mean']:.3f} ± {half * r['std'] / r['n_seeds'] ** 0.5:.3f} (n={r['n_seeds']})"
                             if half is not None and r["std"] is not None else f"{r['mean']:.3f} (n=1)")
        columns[_column_label(part.row(0, named=True), None)] = [cells.get(p, "") for p in ps]
    return pl.DataFrame(columns)


def _column_label(row: dict, main: dict | None) -> str:
    """'model ALGO' for the main setting, else the same plus what differs from it."""
    base = f"{row['model']} {paper.algorithm_label(row['algorithm'])}"
    if main is None:
        return base
    diffs = []
    if row["lr"] != main["lr"]:
        diffs.append(f"lr={T.format_float(row['lr'])}")
    if row["params"] != main["params"]:
        diffs.append(row["params"] or "no knobs")
    if row["scheduler"] != main["scheduler"]:
        diffs.append(str(row["scheduler"]))
    return f"{base} ({', '.join(diffs)})" if diffs else base


def table1(metrics: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Forget score, TOFU utility and math utility tables (those with data): rows p, columns model x algo.

    The forget-score table gets a "... (paper)" column right after each main column whose model and
    algorithm appear in the paper's Table 1.
    """
    final = final_table(metrics)
    if not final.height:
        return {}
    mains = {(r["model"], r["algorithm"]): r for r in main_settings(metrics).iter_rows(named=True)}
    settings = sorted(
        final.select(SETTING).unique().iter_rows(named=True),
        key=lambda s: (
            s["model"] or "",
            _ALGO_ORDER.get(s["algorithm"], 9),
            s["algorithm"] or "",
            _column_label(s, mains.get((s["model"], s["algorithm"]))) != _column_label(s, None),
            s["lr"] or 0.0,
            s["params"] or "",
            s["scheduler"] or "",
        ),
    )
    ps = sorted(p for p in final["p"].unique().to_list() if p is not None)
    tables = {}
    for title, key in (
        (TABLE_FORGET, T.M_FORGET_SCORE),
        (TABLE_TOFU, T.M_TOFU_UTILITY),
        (TABLE_MATH, T.M_MATH_UTILITY),
    ):
        values = final.filter(pl.col("metric") == key)
        if not values.height:
            continue
        columns: dict[str, list] = {"p": ps}
        for setting in settings:
            main = mains.get((setting["model"], setting["algorithm"]))
            cell = values.join(
                pl.DataFrame([setting], schema={c: final.schema[c] for c in SETTING}),
                on=SETTING,
                how="semi",
                nulls_equal=True,
            )
            if not cell.height:
                continue
            by_p = dict(zip(cell["p"].to_list(), cell["mean"].to_list()))
            label = _column_label(setting, main)
            columns[label] = [by_p.get(p) for p in ps]
            is_main = label == _column_label(setting, None)
            if key == T.M_FORGET_SCORE and is_main and paper.paper_model_key(setting["model"]):
                numbers = [paper.paper_forget_score(setting["model"], setting["algorithm"], p) for p in ps]
                if any(v is not None for v in numbers):
                    columns[f"{label} (paper)"] = numbers
        tables[title] = pl.DataFrame(
            columns, schema={c: pl.Int64 if c == "p" else pl.Float64 for c in columns}
        )
    return tables
