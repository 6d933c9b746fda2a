"""report.html: one self-contained page per sweep (tables, figures, findings, links back to MLflow).

Everything the page shows is also left beside it: each table as CSV and Parquet under tables/, each chart
as a standalone HTML (vega inlined) and a PNG under charts/. The PNGs are embedded in report.html as base64,
so the single file can be mailed or attached to a ticket. The page states plainly what it could not compute
(a kind or metric that was never logged) instead of failing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from reteq import tracking as T
from reteq.analysis import charts as C
from reteq.analysis import divergence as D
from reteq.analysis import recency_stats as RS
from reteq.analysis import retrain as RE
from reteq.analysis import tables as TB
from reteq.analysis.leaves import FILE as LEAVES_FILE
from reteq.analysis.leaves import leaves_table
from reteq.analysis.load import experiment_id, load_metrics, load_run_record
from reteq.analysis.page import Renderer, page
from reteq.analysis.paper_numbers import PAPER_RECENCY_CLAIM, paper_recency
from reteq.analysis.re_section import TITLE as RE_TITLE
from reteq.analysis.re_section import retrain_section
from reteq.analysis.retrain import depth_labels
from reteq.analysis.section import Section
from reteq.sweep import mlflow_ui as UI

DEFAULT_UI_BASE = "http://127.0.0.1:5000"
TABLE_GROWTH = "Growth rate of the max gap per cell"
TABLE_GROWTH_ALL = "Growth rates, every metric"
TABLE_DIVERGENCE = "Max gap and spread between orders per step"
TABLE_RECENCY = "Recency per cell"
TABLE_RECENCY_SEEDS = "Recency over seeds (95% intervals)"
TABLE_RUNS = "Runs"
TABLE_RUN_COUNTS = "Runs per kind and status"
TABLE_EXCLUDED = "Runs excluded from the analysis, and why"
TABLE_STATS_INTERVALS = "Recency statistics: final forget score per p, seed mean and 95% t-interval"
TABLE_STATS_TESTS = "Recency statistics: last p against each other p, paired by seed"
TABLE_STATS_EQUAL = "Recency at equal forgetting"
STATS_TITLE = "Recency statistics over seeds"
DEPTH_THRESHOLDS = (0.5, 0.0)  # defaults of eval.depth_fall, eval.depth_margin


@dataclass(frozen=True)
class ReportSettings:
    """How a report reads its sweep: ui_base, the MLflow UI its links point at; depth_thresholds,
    (eval.depth_fall, eval.depth_margin) of the sweep, for the superficial/deep label; forget_target, the
    forget score at which orders are compared at equal forgetting (reteq.analysis.recency_stats)."""

    ui_base: str = DEFAULT_UI_BASE
    depth_thresholds: tuple[float, float] = DEPTH_THRESHOLDS
    forget_target: float = RS.EQUAL_FORGETTING_TARGET


def write_report(
    tracking_uri: str,
    experiment: str,
    out_dir: str | Path,
    plan_text: str | None = None,
    extra_sections: Iterable[Section] = (),
    settings: ReportSettings = ReportSettings(),
) -> Path:
    """Analyse one sweep's experiment and write out_dir/report.html (+ tables/, charts/, leaves.csv); returns the
    page's path. `settings`: the UI links' base and the sweep's own analysis settings (ReportSettings)."""
    ui_base, depth_thresholds = settings.ui_base, settings.depth_thresholds
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exp_id = experiment_id(tracking_uri, experiment)
    runs, excluded = load_run_record(tracking_uri, experiment)
    metrics = load_metrics(tracking_uri, experiment, runs=runs)
    leaves = leaves_table(runs, metrics)
    leaves.write_csv(out / LEAVES_FILE)  # every leaf, so anyone can recompute the tables (reteq.analysis.leaves)
    sections = analysis_sections(runs, metrics, exp_id, settings, leaves)

    re = retrain_section(metrics, RE.load_vectors(tracking_uri, runs), RE.vocab_size(tracking_uri, runs),
                         RE.depth_labels(metrics, *depth_thresholds),
                         load_metrics(tracking_uri, experiment, kinds=(T.KIND_RETRAIN,), runs=runs))
    sections.insert(next((i + 1 for i, x in enumerate(sections) if x.title == "Path divergence"), 1), re)
    _link_sections(sections, exp_id, ui_base)
    sections[-1].paragraphs.append(_excluded_text(excluded))  # the Runs section
    if excluded.height:
        sections[-1].tables[TABLE_EXCLUDED] = excluded
    theory = _theory_section(tracking_uri, experiment)
    if theory is not None:
        sections.append(theory)
    sections.extend(extra_sections)
    plan = Section("Plan", paragraphs=[plan_text]) if plan_text else None
    if plan is not None:
        sections.append(plan)
    renderer = Renderer(out)
    body = "\n".join(renderer.section(s, preformatted=s is plan) for s in sections)
    path = out / "report.html"
    path.write_text(page(f"reteq report: {experiment}", body), encoding="utf-8")
    return path


def analysis_sections(
    runs: pl.DataFrame, metrics: pl.DataFrame, exp_id: str, settings: ReportSettings = ReportSettings(),
    leaves: pl.DataFrame | None = None,
) -> list[Section]:
    """The LLM analysis as report sections: findings, Table 1, divergence, recency (per cell and over seeds),
    figures, runs. `leaves` (reteq.analysis.leaves) is computed from runs and metrics when not given."""
    key = D.primary_forget_metric(metrics)
    divergence = D.path_divergence(metrics)
    growth = D.growth_rates(divergence)
    rec = D.recency(metrics)
    seeds = D.recency_over_seeds(metrics)
    sections = [Section("Findings", paragraphs=findings(runs, metrics, growth, rec, seeds))]
    table1 = TB.table1(metrics)
    intervals = TB.table1_intervals(metrics)
    if intervals is not None:
        table1[TB.TABLE_FORGET_CI] = intervals
    final = TB.final_table(metrics)
    t1 = Section("Table 1: forget score and utilities after the last step", tables=dict(table1))
    t1.paragraphs.append(
        "Rows are p, the position of the forget stage U in the learning order; columns are model x "
        "algorithm, averaged over seeds. Forget score = mean log-prob of the refusal label and paraphrases "
        "before minus after unlearning (higher = more forgetting); TOFU utility = 1 - |change of TOFU "
        "answer log-prob|; math utility = change of GSM8K accuracy. '(paper)' columns are the paper's "
        "Table 1."
    )
    if not table1:
        t1.paragraphs.append("No forget score or utility metric was logged, so Table 1 is empty.")
    if final.height:
        t1.tables[TB.TABLE_FINAL] = final
    sections.append(t1)
    div = Section("Path divergence", tables={}, charts={})
    div.paragraphs.append(
        f"Within a cell (model, algorithm, lr, beta, scheduler, seed) only the learning order differs. "
        f"max gap(t) = largest |difference| between two orders at step t; spread(t) = max - min over orders "
        f"(the same number for a scalar metric). The growth rate is the least-squares slope of log(max gap) "
        f"against step, with its R²; a cell 'grows' when rate > 0 and R² ≥ {D.GROWS_R2}."
    )
    if key is not None and growth.height:
        div.tables[TABLE_GROWTH] = growth.filter(pl.col("metric") == key)
        div.tables[TABLE_GROWTH_ALL] = growth
        div.tables[TABLE_DIVERGENCE] = divergence
    else:
        div.paragraphs.append("Not computed: no cell has two or more learning orders with forget metrics.")
    recency_section = Section("Recency effect", tables={TABLE_RECENCY: rec} if rec.height else {})
    if seeds.height and seeds["n_seeds"].max() >= 2:
        recency_section.tables[TABLE_RECENCY_SEEDS] = seeds
    recency_section.paragraphs.append(
        "Per cell, orders are ranked by final forget score; rank 1 = forgets least. The paper's recency "
        "effect is rank 1 for the order that learned U last (p = 4)."
    )

    figures = Section("Figures", charts=C.all_charts(metrics, divergence,
                                                   depth_labels(metrics, *settings.depth_thresholds)))
    if not figures.charts:
        figures.paragraphs.append("No figure has data: no unlearning step metrics were logged.")
    chart = figures.charts.pop("divergence_growth", None)
    if chart is not None:
        div.charts["divergence_growth"] = chart
    leaves = leaves_table(runs, metrics) if leaves is None else leaves
    sections += [div, recency_section, recency_stats_section(leaves, settings.forget_target), figures,
                 _runs_section(runs, exp_id, settings.ui_base)]
    return sections


def recency_stats_section(leaves: pl.DataFrame, forget_target: float = RS.EQUAL_FORGETTING_TARGET) -> Section:
    """Seed intervals per p, paired tests of the last p, recency at equal forgetting (reteq.analysis.recency_stats),
    computed from the leaves table that is written beside the report as leaves.csv."""
    intervals = RS.per_p_intervals(leaves)
    tests = RS.recency_tests(leaves)
    equal = RS.equal_forgetting(leaves, forget_target)
    section = Section(STATS_TITLE, paragraphs=[RS.summary(tests, intervals, equal)])
    section.paragraphs.append(
        f"Computed from {LEAVES_FILE} beside this page (one row per unlearning leaf). A setting is model x method "
        "x lr x knobs x scheduler. Per p: the seed mean of the final forget score with a two-sided 95% Student-t "
        "interval (mean ± t(0.975, n-1) · sd / √n). The last-learned order (largest p) is compared with each "
        "other order over the seeds both have, paired by seed: d = score(last p) - score(other p); a two-sided "
        "paired t-test (t = mean d / (sd d / √n), n-1 degrees of freedom) and an exact two-sided sign-flip "
        "permutation test (all 2^n sign assignments of d; no normality assumed). Negative mean_diff = the last "
        "order forgot less. p-values are per comparison, not corrected for multiplicity. Equal forgetting: per "
        f"method, the lr at which the first order's seed-mean forget score reaches {forget_target:g}, by linear "
        "interpolation in log(lr) between the two neighbouring swept lrs (no extrapolation), and every order's "
        "seed-mean score interpolated at that lr.")
    for title, table in ((TABLE_STATS_INTERVALS, intervals), (TABLE_STATS_TESTS, tests), (TABLE_STATS_EQUAL, equal)):
        if table.height:
            section.tables[title] = table
    return section


def _link_sections(sections: list[Section], exp_id: str, ui_base: str) -> None:
    """Each section links the runs it was drawn from in the MLflow UI: the unlearning runs' curves (reteq's saved
    views, reteq.sweep.mlflow_ui), the runs measured against a theta_r with theta_r's own, or every run."""
    curves = {"unlearning runs, one curve each": UI.view_url(exp_id, T.VIEW_CURVES, ui_base),
              "grouped by p": UI.view_url(exp_id, T.VIEW_BY_P, ui_base)}
    for sec in sections:
        if sec.title == RE_TITLE:
            sec.links = {"unlearning runs with a θ_r, and the θ_r runs": UI.runs_url(exp_id, UI.RE_FILTER, ui_base),
                         "θ_r runs": UI.runs_url(exp_id, UI.RETRAIN_FILTER, ui_base, charts=False)}
        elif sec.title == "Runs":
            sec.links = {"every run (the sweep's run holds this report under report/)":
                         UI.experiment_url(exp_id, ui_base)}
        else:
            sec.links = dict(curves)


def findings(runs: pl.DataFrame, metrics: pl.DataFrame, growth: pl.DataFrame, rec: pl.DataFrame,
             seeds: pl.DataFrame | None = None) -> list[str]:
    """Plain sentences with numbers: does divergence grow, does the recency effect appear, what is missing."""
    kinds = runs["kind"].drop_nulls().value_counts(sort=True).iter_rows() if runs.height else []
    counts = ", ".join(f"{n} {k}" for k, n in kinds) or "none"
    bad = runs.filter(pl.col("status").is_in([T.STATUS_COLLAPSED, T.STATUS_FAILED]))
    lines = [
        f"Runs in the experiment: {counts}" + (f" ({bad.height} collapsed or failed)." if bad.height else ".")
    ]
    key = D.primary_forget_metric(metrics)
    summary = D.growth_summary(growth, key) if key else {"n_cells": 0}
    if summary["n_cells"]:
        k, n, share = summary["n_growing"], summary["n_cells"], summary["share"]
        verdict = "Divergence grows" if share > 0.5 else "Divergence does not grow in most cells"
        lines.append(
            f"{verdict}: in {k} of {n} cells ({share:.0%}) the max gap between learning orders in {key} "
            f"grows exponentially with the unlearning step (rate > 0 with R² ≥ {D.GROWS_R2}); median rate "
            f"{summary['median_rate']:.4g} per step, median R² {summary['median_r2']:.3f}."
        )
    else:
        lines.append(
            "Divergence could not be measured: no cell has two or more learning orders with a forget "
            "metric logged."
        )
    rs = D.recency_summary(rec)
    if rs["n_cells"]:
        last = sorted(set(rec["last_p"].to_list()))
        who = f"p = {last[0]}" if len(last) == 1 else "the largest p"
        verdict = "The recency effect appears" if rs["share"] > 0.5 else "The recency effect does not appear"
        k_paper, n_paper = paper_recency()
        lines.append(
            f"{verdict}: the order that learned U last ({who}) forgets least in {rs['n_slowest']} of "
            f"{rs['n_cells']} cells ({rs['share']:.0%}); the paper says p = 4 forgets slowest in "
            f"{PAPER_RECENCY_CLAIM[0]} of {PAPER_RECENCY_CLAIM[1]} cells (its Table 1 as printed: lowest in "
            f"{k_paper} of {n_paper})."
        )
        lines += _recency_over_seeds_text(seeds)
    else:
        lines.append(
            "The recency effect could not be judged: no cell has a final forget score "
            f"({T.M_FORGET_SCORE} or {T.M_FORGET_ALL}) for two or more orders."
        )
    present = set(metrics["metric"].unique().to_list()) if metrics.height else set()
    depth = (T.M_DEPTH_R, T.M_DEPTH_C, T.M_DEPTH_U)  # only the Section 4.3 experiment logs these
    missing = [m for m in T.EVAL_METRICS if m not in present and m not in depth]
    if not metrics.height:
        lines.append(
            "No unlearning metrics were logged in this experiment, so the LLM analysis below is empty."
        )
    elif missing:
        lines.append("Not logged (the parts that need them are skipped): " + ", ".join(missing) + ".")
    return [" ".join(lines)]


def _recency_over_seeds_text(seeds: pl.DataFrame | None) -> list[str]:
    """The recency verdict on seed means with their 95% intervals, when some setting has two or more seeds."""
    if seeds is None or not seeds.height or seeds["n_seeds"].max() < 2:
        return []
    n, slowest = seeds.height, int(seeds["last_is_slowest"].sum())
    separated = int(seeds["last_is_separated"].fill_null(False).sum())
    return [f"Over {int(seeds['n_seeds'].min())}+ seeds per setting, the last-learned order has the lowest "
            f"mean forget score in {slowest} of {n} settings (model x algorithm x lr), and its 95% interval lies "
            f"below every other order's in {separated} of {n}."]


def _excluded_text(excluded: pl.DataFrame) -> str:
    """How many runs the analysis left out, and why (counted per reason)."""
    if not excluded.height:
        return "Every run of the experiment finished and counts once: no run was excluded."
    parts = [f"{row['runs']} {row['reason'].split(':')[0]}" for row in
             excluded.with_columns(pl.col("reason").str.split(" (").list.first())
             .group_by("reason").len("runs").sort("reason").iter_rows(named=True)]
    return (f"{excluded.height} run(s) excluded from every table and figure ({', '.join(parts)}): only one "
            f"FINISHED run per node or leaf counts; an unfinished run's last metric is an early step.")


def _runs_section(runs: pl.DataFrame, exp_id: str, ui_base: str) -> Section:
    """Counts per kind and status, and every run with a link to its MLflow page."""
    if not runs.height:
        return Section("Runs", paragraphs=["The experiment has no runs."])
    base = ui_base.rstrip("/")
    counts = runs.group_by("kind", "status").len("runs").sort("kind", "status", nulls_last=True)
    listed = runs.select(
        "run_name",
        "kind",
        "model",
        "order",
        "p",
        "algorithm",
        "lr",
        "params",
        "scheduler",
        "seed",
        "status",
        "start_time",
        "run_id",
    ).with_columns(link=pl.concat_str([pl.lit(f"{base}/#/experiments/{exp_id}/runs/"), pl.col("run_id")]))
    return Section(
        "Runs",
        paragraphs=[f"MLflow UI links assume the UI at {base} (reteq ui)."],
        tables={TABLE_RUN_COUNTS: counts, TABLE_RUNS: listed},
    )


def _theory_section(tracking_uri: str, experiment: str) -> Section | None:
    """The theory grid's section when this experiment holds one; a failure there still leaves the report."""
    # lazy: Ray/MLflow only for the theory section (tests swap this module)
    from reteq.theory.report import theory_section

    try:
        return theory_section(tracking_uri, experiment)
    except Exception as err:  # noqa: BLE001 - the rest of the report is still worth writing
        return Section("Theory (Section 3)", paragraphs=[f"The theory section failed: {type(err).__name__}: {err}"])

