"""The paper's figures as altair charts from the tidy metrics frame; each returns None when it has no data.

Conventions every chart follows, so figures read the same: x is the unlearning step, p (position of the forget
stage) is ordinal and always the colour with a legend titled "p", panels are facets with horizontal headers,
each y-axis is titled with what it measures, and panels have independent y scales (GA moves log-likelihoods by
far more than NPO, a shared scale would flatten NPO to a line).
Figures 1 and 3 show each (model, algorithm)'s main setting (tables.main_settings) averaged over seeds.
"""

from __future__ import annotations

from pathlib import Path

import altair as alt
import polars as pl

from reteq import tracking as T
from reteq.analysis import divergence as D
from reteq.analysis.paper_numbers import algorithm_label
from reteq.analysis.tables import main_settings, restrict_to_main

WIDTH, HEIGHT = 260, 190
P_COLOR = alt.Color(
    "p:O",
    title="p",
    scale=alt.Scale(scheme="dark2"),
    legend=alt.Legend(orient="right", symbolOpacity=1, symbolType="circle"),
)
STEP_X = alt.X("step:Q", title="unlearning step")
METRIC_TITLE = {
    T.M_FORGET_LABEL: "label log-lik. per token",
    T.M_FORGET_ALL: "label+paraphrase log-lik.",
    T.M_FORGET_PARAPHRASE: "paraphrase log-lik.",
    T.M_FORGET_SCORE: "forget score",
    T.M_TOFU_LOGP: "TOFU log-lik. per token",
}


def _with_labels(df: pl.DataFrame) -> pl.DataFrame:
    """Add the human-readable panel labels used as facet headers."""
    algo = pl.col("algorithm").map_elements(algorithm_label, return_dtype=pl.String)
    lr = pl.col("lr").map_elements(T.format_float, return_dtype=pl.String)
    return df.with_columns(
        algo=algo,
        panel=pl.concat_str([pl.col("model"), algo], separator=" · "),
        lr_label=pl.concat_str([pl.lit("lr = "), lr]),
    )


def _seed_mean(df: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    return df.group_by([*by, "p", "step"]).agg(pl.col("value").mean()).sort([*by, "p", "step"])


def _header(row: bool = False) -> alt.Header:
    """Facet headers read horizontally: row labels left-aligned beside the panel, column labels centred."""
    return alt.Header(
        title=None,
        labelAngle=0,
        labelAlign="left" if row else "center",
        labelFontSize=13,
        labelFontWeight="bold",
        labelLimit=240,
    )


def _finish(chart: alt.FacetChart, title: str, subtitle: str | None = None) -> alt.FacetChart:
    heading = alt.TitleParams(
        title, subtitle=subtitle or "", fontSize=16, subtitleFontSize=12, anchor="start"
    )
    return (
        chart.properties(title=heading)
        .resolve_scale(y="independent")
        .configure_axis(labelFontSize=12, titleFontSize=13)
        .configure_legend(labelFontSize=12, titleFontSize=13)
    )


def _lines(df: pl.DataFrame, y_title: str) -> alt.Chart:
    return (
        alt.Chart(df)
        .mark_line(point=alt.OverlayMarkDef(size=25), strokeWidth=2)
        .encode(
            x=STEP_X,
            y=alt.Y("value:Q", title=y_title, scale=alt.Scale(zero=False)),
            color=P_COLOR,
            tooltip=["p:O", "step:Q", alt.Tooltip("value:Q", format=".4f")],
        )
        .properties(width=WIDTH, height=HEIGHT)
    )


def _metric(metrics: pl.DataFrame, key: str | None) -> pl.DataFrame:
    if key is None or not metrics.height:
        return metrics.clear()
    return metrics.filter(
        (pl.col("metric") == key) & pl.col("value").is_not_null() & pl.col("value").is_finite()
    )


def figure1(metrics: pl.DataFrame) -> alt.FacetChart | None:
    """Figure 1: the unlearn label's log-likelihood vs step, a line per p, a panel per model x algorithm."""
    key = D.primary_forget_metric(metrics)
    df = _metric(restrict_to_main(metrics), key)
    if not df.height:
        return None
    df = _with_labels(_seed_mean(df, ["model", "algorithm", "lr"]))
    chart = _lines(df, METRIC_TITLE.get(key, key)).facet(
        column=alt.Column("model:N", header=_header()), row=alt.Row("algo:N", header=_header(row=True))
    )
    return _finish(
        chart,
        "Figure 1: forget-set log-likelihood during unlearning",
        f"{key}; one line per position p of the forget stage; mean over seeds",
    )


def figure3(metrics: pl.DataFrame) -> alt.FacetChart | None:
    """Figure 3: forget-label and TOFU log-likelihood side by side; rows NPO and SimNPO (else what exists)."""
    key = D.primary_forget_metric(metrics)
    main = restrict_to_main(metrics)
    wanted = main.filter(pl.col("algorithm").is_in(["npo", "simnpo"]))
    main = wanted if wanted.height else main
    df = pl.concat([_metric(main, key), _metric(main, T.M_TOFU_LOGP)])
    if not df.height or df["metric"].n_unique() < 2:
        return None
    titles = {key: "forget set: " + METRIC_TITLE.get(key, key), T.M_TOFU_LOGP: "retained: TOFU answers"}
    df = _with_labels(_seed_mean(df, ["model", "algorithm", "lr", "metric"])).with_columns(
        measure=pl.col("metric").replace_strict(titles)
    )
    chart = _lines(df, "log-likelihood per token").facet(
        column=alt.Column("measure:N", header=_header(), sort=list(titles.values())),
        row=alt.Row("panel:N", header=_header(row=True)),
    )
    return _finish(chart, "Figure 3: forgetting vs retained TOFU knowledge", "mean over seeds")


def figure5(metrics: pl.DataFrame) -> alt.FacetChart | None:
    """Figure 5: mean over seeds with a 95% t-interval band, for settings that have at least two seeds."""
    key = D.primary_forget_metric(metrics)
    df = _metric(restrict_to_main(metrics), key)
    if not df.height:
        return None
    summary = D.seed_summary(df)
    summary = summary.filter(pl.col("n").max().over(["model", "algorithm"]) >= 2)
    if not summary.height:
        return None
    summary = _with_labels(summary).rename({"mean": "value"})
    band = (
        alt.Chart()
        .mark_area(opacity=0.25)
        .encode(
            x=STEP_X,
            y=alt.Y("ci_low:Q", title=METRIC_TITLE.get(key, key), scale=alt.Scale(zero=False)),
            y2="ci_high:Q",
            color=P_COLOR,
        )
    )
    line = alt.Chart().mark_line(strokeWidth=2).encode(x=STEP_X, y="value:Q", color=P_COLOR)
    chart = (
        alt.layer(band, line, data=summary)
        .properties(width=WIDTH, height=HEIGHT)
        .facet(
            column=alt.Column("algo:N", header=_header()), row=alt.Row("model:N", header=_header(row=True))
        )
    )
    n = int(summary["n"].max())
    return _finish(
        chart, "Figure 5: seed variability", f"{key}; mean over up to {n} seeds with 95% t-interval"
    )


def _grid(metrics: pl.DataFrame, vary: str, fixed: list[str]) -> pl.DataFrame:
    """Runs at the main setting's `fixed` fields, in (model, algorithm) groups where `vary` has 2+ values."""
    df = _metric(metrics, D.primary_forget_metric(metrics))
    if not df.height:
        return df
    df = df.join(
        main_settings(metrics).select("model", "algorithm", *fixed),
        on=["model", "algorithm", *fixed],
        how="semi",
        nulls_equal=True,
    )
    return df.filter(pl.col(vary).n_unique().over(["model", "algorithm"]) >= 2)


def figure6(metrics: pl.DataFrame) -> alt.FacetChart | None:
    """Figure 6: the learning-rate grid, a panel per unlearning lr (scheduler and beta as in main)."""
    df = _grid(metrics, "lr", ["params", "scheduler"])
    if not df.height:
        return None
    key = D.primary_forget_metric(metrics)
    df = _with_labels(_seed_mean(df, ["model", "algorithm", "lr"]))
    lr_order = df.sort("lr")["lr_label"].unique(maintain_order=True).to_list()
    chart = _lines(df, METRIC_TITLE.get(key, key)).facet(
        column=alt.Column("lr_label:N", header=_header(), sort=lr_order),
        row=alt.Row("panel:N", header=_header(row=True)),
    )
    return _finish(chart, "Figure 6: learning-rate grid", f"{key}; mean over seeds")


def figure8(metrics: pl.DataFrame) -> alt.FacetChart | None:
    """Figure 8: finetuning schedules (WSD vs cosine), a panel per scheduler (lr and beta as in main)."""
    df = _grid(metrics, "scheduler", ["lr", "params"])
    if not df.height:
        return None
    key = D.primary_forget_metric(metrics)
    df = _with_labels(_seed_mean(df, ["model", "algorithm", "lr", "scheduler"]))
    chart = _lines(df, METRIC_TITLE.get(key, key)).facet(
        column=alt.Column("scheduler:N", header=_header()), row=alt.Row("panel:N", header=_header(row=True))
    )
    return _finish(chart, "Figure 8: finetuning LR schedule", f"{key}; mean over seeds")


def divergence_chart(divergence: pl.DataFrame, metrics: pl.DataFrame) -> alt.Chart | None:
    """Max pairwise gap between orders vs step, log scale: a straight rising line is exponential growth.

    One line per (model, algorithm): colour = model, dash = algorithm (colours alone run out at 5 x 3).
    """
    key = D.primary_forget_metric(metrics)
    if key is None or not divergence.height:
        return None
    main = main_settings(metrics)
    df = divergence.filter((pl.col("metric") == key) & (pl.col("max_gap") > 0)).join(
        main, on=D.SETTING, how="semi", nulls_equal=True
    )
    if not df.height:
        return None
    df = _with_labels(
        df.group_by("model", "algorithm", "lr", "step").agg(pl.col("max_gap").mean()).sort("step")
    )
    chart = (
        alt.Chart(df)
        .mark_line(strokeWidth=2.5)
        .encode(
            x=STEP_X,
            y=alt.Y("max_gap:Q", title="max gap between orders (log scale)", scale=alt.Scale(type="log")),
            color=alt.Color(
                "model:N",
                title="model",
                legend=alt.Legend(orient="right", labelLimit=260, symbolStrokeWidth=3),
            ),
            strokeDash=alt.StrokeDash(
                "algo:N",
                title="algorithm",
                legend=alt.Legend(
                    symbolType="stroke", symbolStrokeWidth=2, symbolSize=500, symbolStrokeColor="#333"
                ),
            ),
            detail="panel:N",
            tooltip=["panel:N", "step:Q", alt.Tooltip("max_gap:Q", format=".4g")],
        )
        .properties(
            width=420,
            height=260,
            title=alt.TitleParams(
                "Divergence between learning orders",
                subtitle=f"{key}; max over pairs of orders, mean over seeds",
                fontSize=16,
                subtitleFontSize=12,
                anchor="start",
            ),
        )
    )
    return chart.configure_axis(labelFontSize=12, titleFontSize=13).configure_legend(
        labelFontSize=12, titleFontSize=13
    )


def figure4(metrics: pl.DataFrame, labels: pl.DataFrame | None = None) -> alt.FacetChart | None:
    """Figure 4: R / C / U log-probs along unlearning U, a panel per learning order (Section 4.3).

    Deep forgetting: C (the other compliance phrasing) falls with U; superficial: only U falls. With `labels`
    (analysis.retrain.depth_labels) each panel's header carries its order's label."""
    keys = {T.M_DEPTH_R: "R (refusal)", T.M_DEPTH_C: "C (compliance)", T.M_DEPTH_U: "U (unlearned)"}
    df = metrics.filter(pl.col("metric").is_in(list(keys)) & pl.col("value").is_finite())
    if not df.height:
        return None
    df = (df.group_by(["model", "order", "metric", "step"]).agg(pl.col("value").mean())
          .with_columns(response=pl.col("metric").replace_strict(keys)).sort(["order", "step"]))
    if labels is not None and labels.height:
        per_order = labels.group_by("order").agg(pl.col("label").mode().first())
        df = df.join(per_order, on="order", how="left").with_columns(
            order=pl.concat_str([pl.col("order"), pl.col("label").fill_null("?")], separator=" · "))
    chart = (
        alt.Chart(df)
        .mark_line(point=alt.OverlayMarkDef(size=25), strokeWidth=2)
        .encode(x=STEP_X, y=alt.Y("value:Q", title="log-prob per token", scale=alt.Scale(zero=False)),
                color=alt.Color("response:N", title="response", scale=alt.Scale(scheme="set1")),
                tooltip=["order:N", "response:N", "step:Q", alt.Tooltip("value:Q", format=".4f")])
        .properties(width=200, height=150)
        .facet(facet=alt.Facet("order:N", header=_header(), title=None), columns=3)
    )
    return _finish(chart, "Figure 4: superficial vs deep forgetting",
                   "R/C/U log-probs while U is unlearned; one panel per learning order")


def figure7(metrics: pl.DataFrame) -> alt.FacetChart | None:
    """Figure 7: forget quality vs retained utility after the last step, a point per run (panel per lr)."""
    final = metrics.filter(pl.col("metric").is_in([T.M_FORGET_SCORE, T.M_TOFU_UTILITY]) & pl.col("value").is_finite())
    if not final.height:
        return None
    last = final.filter(pl.col("step") == pl.col("step").max().over(["run_id", "metric"]))
    wide = last.pivot(on="metric", index=["run_id", "model", "algorithm", "lr", "p"], values="value")
    if T.M_FORGET_SCORE not in wide.columns or T.M_TOFU_UTILITY not in wide.columns:
        return None
    if wide.filter(pl.col("lr") == 5e-5).height:  # the paper's Figure 7 setting
        wide = wide.filter(pl.col("lr") == 5e-5)
    wide = _with_labels(wide.rename({T.M_FORGET_SCORE: "forget", T.M_TOFU_UTILITY: "utility"}))
    chart = (
        alt.Chart(wide)
        .mark_point(size=90, filled=True)
        .encode(x=alt.X("forget:Q", title="forget score (higher = more forgetting)"),
                y=alt.Y("utility:Q", title="TOFU utility (1 - |change|)", scale=alt.Scale(zero=False)),
                color=P_COLOR, shape=alt.Shape("algo:N", title="algorithm"),
                tooltip=["model:N", "algo:N", "p:O", alt.Tooltip("forget:Q", format=".3f"),
                         alt.Tooltip("utility:Q", format=".3f")])
        .properties(width=WIDTH, height=HEIGHT)
        .facet(column=alt.Column("lr_label:N", header=_header()), row=alt.Row("model:N", header=_header(row=True)))
    )
    return _finish(chart, "Figure 7: forget quality vs retained utility", "after the last unlearning step")


def all_charts(metrics: pl.DataFrame, divergence: pl.DataFrame,
               depth_labels: pl.DataFrame | None = None) -> dict[str, alt.TopLevelMixin]:
    """Every chart that has data, keyed by a file-safe name (the report's order)."""
    charts = {
        "figure1_forget_label": figure1(metrics),
        "figure3_forget_vs_tofu": figure3(metrics),
        "figure4_depth": figure4(metrics, depth_labels),
        "figure5_seeds": figure5(metrics),
        "figure6_lr_grid": figure6(metrics),
        "figure7_forget_vs_utility": figure7(metrics),
        "figure8_scheduler": figure8(metrics),
        "divergence_growth": divergence_chart(divergence, metrics),
    }
    return {name: chart for name, chart in charts.items() if chart is not None}


def save_chart(chart: alt.TopLevelMixin, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write name.html (vega inlined: no CDN, works offline) and name.png (vl-convert, 2x); return both."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html, png = out / f"{name}.html", out / f"{name}.png"
    with alt.data_transformers.disable_max_rows():
        chart.save(str(html), inline=True)
        chart.save(str(png), scale_factor=2)
    return html, png
