"""The theory report section, read back from MLflow (the system of record), never from in-memory results.

Why re-read: the report must describe what a finished grid logged, so it works for a grid run yesterday, on
another machine, or by `reteq theory` in another process. It picks the latest theory grid (parent run of kind
sweep with theory children) in the experiment and summarises its child runs.
"""

from __future__ import annotations

import math
from typing import Any

import altair as alt
import polars as pl

from reteq import tracking as tk
from reteq.analysis.section import Section
from reteq.mlflow_store import reader, search_runs
from reteq.theory import grid as g

TITLE = "Theory: path dependence of gradient-ascent unlearning in linear regression (Section 3)"
CELL_COLUMNS = ["d", "n_a", "n_b", "k", "mu", "eta"]
INT_PARAMS = {"d", "n_a", "n_b", "k", "m", "seed", "t0", "steps"}
REPRESENTATIVES = 4
QUANTITIES = ["divergence d(theta_AB(t), theta_BA(t))", "Theorem 3.1 lower bound"]


def _latest_grid(client, experiment_id: str) -> tuple[Any, list] | None:
    """(parent run, its theory child runs) of the most recent grid that has children, or None."""
    parents = search_runs(
        client,
        experiment_id,
        f"tags.`{tk.TAG_KIND}` = '{tk.KIND_SWEEP}'",
        order_by=["attributes.start_time DESC"],
    )
    for parent in parents:
        children = search_runs(
            client,
            experiment_id,
            f"tags.`{tk.TAG_KIND}` = '{tk.KIND_THEORY}' and "
            f"tags.`{tk.TAG_MLFLOW_PARENT}` = '{parent.info.run_id}'",
        )
        if children:
            return parent, children
    return None


def runs_frame(children: list) -> pl.DataFrame:
    """One row per instance: its params (typed) and summary metrics (last logged values)."""
    rows = []
    for run in children:
        row: dict[str, Any] = {"run_id": run.info.run_id}
        for key in (*g.INSTANCE_PARAMS, tk.P_STEPS):
            if key in run.data.params:
                value = run.data.params[key]
                row[key] = int(value) if key in INT_PARAMS else float(value)
        for key, value in run.data.metrics.items():
            row[key] = float(value)
        rows.append(row)
    return (
        pl.DataFrame(rows, infer_schema_length=None)
        .with_columns((2.0 * pl.col(tk.M_THEORY_LOG1P_RHO)).alias("predicted_rate"))
        .sort(CELL_COLUMNS + ["seed"])
    )


def _metric_or_null(frame: pl.DataFrame, key: str) -> pl.Expr:
    return pl.col(key) if key in frame.columns else pl.lit(None, dtype=pl.Float64)


def cell_table(frame: pl.DataFrame) -> pl.DataFrame:
    """Summary per grid cell: how often the bound held and the typical theorem quantities."""
    return (
        frame.group_by(CELL_COLUMNS, maintain_order=True)
        .agg(
            pl.len().alias("instances"),
            pl.col(tk.M_THEORY_BOUND_HOLDS).mean().alias("bound_held_share"),
            (pl.col(tk.M_THEORY_BOUND_CHECKED) > 0).sum().alias("nonvacuous"),
            pl.col("rho_star").median().alias("median_rho_star"),
            pl.col("t0").median().alias("median_t0"),
            _metric_or_null(frame, tk.M_THEORY_MIN_LOG_MARGIN).min().alias("min_log_margin"),
            _metric_or_null(frame, tk.M_THEORY_GROWTH_RATE).median().alias("median_growth_rate"),
            pl.col("predicted_rate").median().alias("median_2log1p_rho"),
            pl.col(tk.M_THEORY_RETRAIN_GAP_MIN).median().alias("median_retrain_gap_min"),
        )
        .sort(CELL_COLUMNS)
    )


def _paragraphs(frame: pl.DataFrame, steps: int) -> list[str]:
    n = frame.height
    held = int(frame[tk.M_THEORY_BOUND_HOLDS].sum())
    checked = int((frame[tk.M_THEORY_BOUND_CHECKED] > 0).sum())
    out = [
        f"Theorem 3.1's lower bound held at every step t >= max(t0, 0) on {held} of {n} random instances "
        f"({held / n:.1%}); on {checked} of them t0 fell inside the {steps}-step horizon, so the check was "
        f"not vacuous. Median rho* = {frame['rho_star'].median():.3g}, "
        f"median t0 = {frame['t0'].median():.3g}."
    ]
    if tk.M_THEORY_MIN_LOG_MARGIN in frame.columns and frame[tk.M_THEORY_MIN_LOG_MARGIN].drop_nulls().len():
        margin = frame[tk.M_THEORY_MIN_LOG_MARGIN].drop_nulls()
        out.append(
            f"The divergence stayed above the bound by a factor of at least {math.exp(margin.min()):.3g} "
            f"(median over instances of the smallest factor: {math.exp(margin.median()):.3g})."
        )
    if tk.M_THEORY_GROWTH_RATE in frame.columns:
        fitted = frame.filter(pl.col(tk.M_THEORY_GROWTH_RATE).is_not_null() & pl.col(tk.M_THEORY_GROWTH_RATE).is_not_nan())
        if fitted.height:
            above = int((fitted[tk.M_THEORY_GROWTH_RATE] >= fitted["predicted_rate"]).sum())
            ratio = (fitted[tk.M_THEORY_GROWTH_RATE] / fitted["predicted_rate"]).median()
            out.append(
                f"The fitted growth rate of log divergence over the checked steps was at least the "
                f"theorem's 2 log(1 + rho*) on {above} of {fitted.height} instances (median ratio "
                f"{ratio:.3g}, median R^2 {fitted[tk.M_THEORY_GROWTH_R2].median():.4f}): the divergence between "
                "the two learning orders grows exponentially under gradient ascent."
            )
    closest = {p: f"{tk.M_THEORY_RETRAIN_CLOSEST_P}{p}" for p in (1, 2, 3)}
    if all(c in frame.columns for c in closest.values()):
        by_pos = ", ".join(f"p={p}: {frame[c].median():.3g}" for p, c in closest.items())
        best_alone = frame.select(pl.min_horizontal(list(closest.values()))).to_series()
        out.append(
            f"Retrain gap over the six orders of {{A, B, U}} (each compared with its own retrain model, the "
            f"retain stages in the same order): stopping every path at one shared step t, the worst order "
            f"stays at min_t max_order d(theta_u(t), theta_r) = {frame[tk.M_THEORY_RETRAIN_GAP_MIN].median():.3g} "
            f"(median over instances), while the closest single order gets to {best_alone.median():.3g}. "
            f"Closest approach by position p of the forget stage (median): {by_pos}."
        )
    if tk.M_THEORY_NPO_DIVERGENCE in frame.columns:
        final_ga = frame[tk.M_THEORY_DIVERGENCE].median() if tk.M_THEORY_DIVERGENCE in frame.columns else None
        npo, simnpo = frame[tk.M_THEORY_NPO_DIVERGENCE], frame[tk.M_THEORY_SIMNPO_DIVERGENCE]
        ga_text = f"{final_ga:.3g} under GA, " if final_ga is not None else ""
        out.append(
            f"At the last step the median divergence was {ga_text}{npo.median():.3g} under the NPO-like rule "
            f"and {simnpo.median():.3g} under the SimNPO-like rule: their vanishing weights stop the "
            f"exponential growth, yet the two orders still differ on {int((npo > 0).sum())} and "
            f"{int((simnpo > 0).sum())} of {n} instances."
        )
    return out


def _representatives(frame: pl.DataFrame) -> pl.DataFrame:
    """The lowest-seed instance of up to REPRESENTATIVES cells spread evenly over the grid."""
    firsts = frame.group_by(CELL_COLUMNS, maintain_order=True).agg(pl.all().sort_by("seed").first())
    if firsts.height <= REPRESENTATIVES:
        return firsts
    step = (firsts.height - 1) / (REPRESENTATIVES - 1)
    return firsts[[round(i * step) for i in range(REPRESENTATIVES)]]


def _label(row: dict[str, Any]) -> str:
    return f"d={row['d']} k={row['k']} mu={row['mu']:g} eta={row['eta']:g} seed={row['seed']}"


def divergence_chart(client, frame: pl.DataFrame):
    rows = []
    for row in _representatives(frame).iter_rows(named=True):
        for key, quantity in zip((tk.M_THEORY_DIVERGENCE, tk.M_THEORY_BOUND), QUANTITIES):
            for m in client.get_metric_history(row["run_id"], key):
                rows.append({"instance": _label(row), "quantity": quantity, "t": m.step, "value": m.value})
    if not rows:
        return None
    data = pl.DataFrame(rows).filter(pl.col("value") > 0)
    return (
        alt.Chart(data)
        .mark_line()
        .encode(
            x=alt.X("t:Q", title="unlearning step t"),
            y=alt.Y(
                "value:Q",
                scale=alt.Scale(type="log"),
                title="squared prediction distance (log scale)",
                axis=alt.Axis(format=".0e"),
            ),
            color=alt.Color("instance:N", title="instance"),
            strokeDash=alt.StrokeDash(
                "quantity:N",
                title="curve",
                legend=alt.Legend(labelLimit=320),
                scale=alt.Scale(domain=QUANTITIES, range=[[1, 0], [6, 4]]),
            ),
            tooltip=["instance:N", "quantity:N", "t:Q", "value:Q"],
        )
        .properties(
            title="Divergence between learning orders vs the Theorem 3.1 lower bound", width=520, height=320
        )
    )


def growth_chart(frame: pl.DataFrame):
    if tk.M_THEORY_GROWTH_RATE not in frame.columns:
        return None
    data = (
        frame.filter(pl.col(tk.M_THEORY_GROWTH_RATE).is_not_null() & pl.col(tk.M_THEORY_GROWTH_RATE).is_not_nan())
        .select("predicted_rate", tk.M_THEORY_GROWTH_RATE, "eta", "k", "d", "seed")
        .rename({tk.M_THEORY_GROWTH_RATE: "growth_rate"})
    )
    if data.height == 0:
        return None
    hi = float(max(data["predicted_rate"].max(), data["growth_rate"].max())) * 1.05
    lo = float(min(data["predicted_rate"].min(), data["growth_rate"].min(), 0.0))
    line = pl.DataFrame({"x": [lo, hi], "y": [lo, hi], "reference": ["y = x"] * 2})
    points = (
        alt.Chart(data)
        .mark_point(size=40, opacity=0.7, filled=True)
        .encode(
            x=alt.X("predicted_rate:Q", title="2 log(1 + rho*)  (growth rate of the Theorem 3.1 bound)"),
            y=alt.Y("growth_rate:Q", title="fitted growth rate of log divergence"),
            color=alt.Color("eta:N", title="eta"),
            shape=alt.Shape("k:N", title="k"),
            tooltip=["d:Q", "k:Q", "eta:Q", "seed:Q", "predicted_rate:Q", "growth_rate:Q"],
        )
    )
    diagonal = (
        alt.Chart(line)
        .mark_line(color="black", strokeDash=[4, 4])
        .encode(x="x:Q", y="y:Q", opacity=alt.Opacity("reference:N", title="reference", legend=alt.Legend()))
    )
    return (points + diagonal).properties(
        title="Fitted growth rate vs the theorem's rate", width=420, height=360
    )


def theory_section(tracking_uri: str, experiment: str) -> Section | None:
    """The report section for the latest theory grid in `experiment`, or None when there is none."""
    client = reader(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = _latest_grid(client, exp.experiment_id)
    if found is None:
        return None
    _, children = found
    frame = runs_frame(children)
    steps = int(frame["steps"].max()) if "steps" in frame.columns else 0
    section = Section(title=TITLE, paragraphs=_paragraphs(frame, steps))
    section.tables["theory_cells"] = cell_table(frame)
    for name, chart in (
        ("theory_divergence", divergence_chart(client, frame)),
        ("theory_growth", growth_chart(frame)),
    ):
        if chart is not None:
            section.charts[name] = chart
    return section
