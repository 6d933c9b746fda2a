"""report.html end to end on real MLflow SQLite stores: a full planted sweep, a partial one, an empty one."""

from __future__ import annotations

import html
import sys
import types

import polars as pl
import pytest
from analysis_fixtures import CELLS, EXPERIMENT, write_planted
from mlflow import MlflowClient

from reteq import tracking as T
from reteq.analysis import report, tables
from reteq.analysis.leaves import REQUIRED
from reteq.analysis.mlflow_report import log_report
from reteq.analysis.page import slug
from reteq.analysis.section import Section
from reteq.sweep import mlflow_ui


def _text(page: str) -> str:
    """The page as a reader sees the words (entities decoded)."""
    return html.unescape(page)


def test_full_report(sqlite_tracking, tmp_path):
    uri, artifacts = sqlite_tracking
    exp_id = write_planted(uri, artifacts)
    out = tmp_path / "report"
    path = report.write_report(uri, EXPERIMENT, out, plan_text="plan: 4 orders x 2 algorithms <b>bold?</b>")
    assert path == out / "report.html" and path.is_file()
    page = path.read_text(encoding="utf-8")
    text = _text(page)

    assert (
        "Divergence grows: in 8 of 8 cells (100%) the max gap between learning orders in "
        "forget/label_logp grows exponentially"
    ) in text
    assert "median rate 0.125 per step, median R² 1.000" in text
    assert (
        "The recency effect appears: the order that learned U last (p = 4) forgets least in 6 of 8 cells "
        "(75%)" in text
    )
    expected_tables = [
        tables.TABLE_FORGET,
        tables.TABLE_TOFU,
        tables.TABLE_MATH,
        tables.TABLE_FINAL,
        report.TABLE_GROWTH,
        report.TABLE_GROWTH_ALL,
        report.TABLE_DIVERGENCE,
        report.TABLE_RECENCY,
        report.TABLE_RUN_COUNTS,
        report.TABLE_RUNS,
    ]
    for title in expected_tables:
        assert f"<h3>{html.escape(title)}</h3>" in page, title
        stem = slug(title)
        assert (out / "tables" / f"{stem}.csv").is_file(), title
        assert pl.read_parquet(out / "tables" / f"{stem}.parquet").height > 0, title
    forget = pl.read_parquet(out / "tables" / f"{slug(tables.TABLE_FORGET)}.parquet")
    assert forget["p"].to_list() == [1, 2, 3, 4] and "llama-3.2-1b GA (paper)" in forget.columns

    assert page.count("data:image/png;base64,") == 7  # six paper figures + divergence growth
    assert 'href="charts/figure1_forget_label.html"' in page
    assert (out / "charts" / "figure1_forget_label.png").read_bytes()[:4] == b"\x89PNG"
    run_id = MlflowClient(uri).search_runs([exp_id], max_results=1)[0].info.run_id
    assert f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run_id}" in page
    assert "&lt;b&gt;bold?&lt;/b&gt;" in page and "<b>bold?</b>" not in page  # plan text escaped
    # each analysis section links the runs it was drawn from: reteq's saved views of the unlearning curves
    view = html.escape(mlflow_ui.view_url(exp_id, T.VIEW_CURVES), quote=True)
    assert page.count(f'<a href="{view}">') == 6  # findings, Table 1, divergence, recency, its statistics, figures
    assert html.escape(mlflow_ui.runs_url(exp_id, mlflow_ui.RE_FILTER), quote=True) in page

    # the report inside MLflow: logged under report/ of the sweep's parent run, whose experiment gets the views
    client = MlflowClient(uri)
    parent = log_report(uri, EXPERIMENT, out)
    assert client.get_run(parent).data.tags[T.TAG_KIND] == T.KIND_SWEEP
    logged = {a.path for a in client.list_artifacts(parent, T.ARTIFACT_REPORT)}
    assert {f"{T.ARTIFACT_REPORT}/report.html", f"{T.ARTIFACT_REPORT}/charts", f"{T.ARTIFACT_REPORT}/tables"} <= logged
    assert any(a.path.endswith(".png") for a in client.list_artifacts(parent, f"{T.ARTIFACT_REPORT}/charts"))
    tags = client.get_experiment(exp_id).tags
    assert tags[T.TAG_EXPERIMENT_KIND] == T.EXPERIMENT_KIND_TRAINING and T.TAG_SAVED_VIEW.format(T.VIEW_CURVES) in tags
    assert "<script src=" not in page

    # leaves.csv: one row per unlearning leaf, the columns, and the statistics agree with it
    leaves = pl.read_csv(out / "leaves.csv")
    assert leaves.height == len(CELLS) * 4 and set(REQUIRED) <= set(leaves.columns)
    assert leaves["re_distance_end"].null_count() == leaves.height  # no θ_r in the planted sweep: empty cells
    ga4 = leaves.filter((pl.col("method") == "ga") & (pl.col("lr") == 1e-5) & (pl.col("scheduler") == "wsd")
                        & (pl.col("p") == 4)).sort("seed")
    assert ga4["forget_score"].to_list() == pytest.approx([0.5, 0.6, 0.7])  # FINAL_SCORE + 0.1 * seed
    assert ga4["math_acc_start"].to_list() == pytest.approx([0.3] * 3)
    assert ga4["math_acc_end"].to_list() == pytest.approx([0.3 - 0.08] * 3)
    assert report.STATS_TITLE in text
    stats = pl.read_csv(out / "tables" / f"{slug(report.TABLE_STATS_TESTS)}.csv")
    npo = stats.filter((pl.col("method") == "npo") & (pl.col("other_p") == 2)).row(0, named=True)
    # NPO p=4 vs p=2 per seed: (0.5 - 2.0, 0.6 - 2.1, 1.2 - 0.4) -- seed 2 is planted without recency
    d = [-1.5, -1.5, 0.8]
    assert npo["n_pairs"] == 3 and npo["mean_diff"] == pytest.approx(sum(d) / 3)
    assert npo["signflip_pvalue"] == pytest.approx(4 / 8)  # |sum| 2.2 reached by 4 of the 8 sign flips
    intervals = pl.read_csv(out / "tables" / f"{slug(report.TABLE_STATS_INTERVALS)}.csv")
    assert intervals.height == leaves.select("method", "lr", "scheduler", "p").unique().height


def _theory_module(section_or_error):
    """A stand-in for reteq.theory.report (built by another engineer) that honours its contract."""
    module = types.ModuleType("reteq.theory.report")

    def theory_section(tracking_uri, experiment):
        if isinstance(section_or_error, Exception):
            raise section_or_error
        return section_or_error

    module.theory_section = theory_section
    return module


def test_report_on_partial_and_empty_experiments(sqlite_tracking, tmp_path, monkeypatch):
    """Missing metrics and kinds are stated, not fatal. Two experiments share one store (stores are slow)."""
    uri, artifacts = sqlite_tracking
    theory = Section(
        "Theory (Section 3)",
        paragraphs=["closed-form divergence beats the bound"],
        tables={"Theory grid": pl.DataFrame({"t": [0, 1], "divergence": [0.5, 1.5]})},
    )
    monkeypatch.setitem(sys.modules, "reteq.theory.report", _theory_module(theory))
    write_planted(
        uri,
        artifacts,
        cells=CELLS[:6],
        metrics=(T.M_FORGET_LABEL, T.M_FORGET_ALL),
        with_math=False,
        with_finetune=False,
    )
    extra = Section(
        "Extra notes",
        paragraphs=["from another producer"],
        tables={"Extra table": pl.DataFrame({"a": [1, 2]})},
    )
    path = report.write_report(
        uri, EXPERIMENT, tmp_path / "partial", extra_sections=[extra],
        settings=report.ReportSettings(ui_base="http://mlflow:8080/")
    )
    text = _text(path.read_text(encoding="utf-8"))
    assert (
        "Not logged (the parts that need them are skipped): forget/paraphrase_logp, forget/score, "
        "utility/tofu_logp, utility/tofu, utility/math_acc, utility/math." in text
    )
    # the forget score is derived from forget/all_logp; NPO seed 2 is the one planted cell without recency
    assert "forgets least in 5 of 6 cells (83%)" in text
    assert "Divergence grows: in 6 of 6 cells (100%)" in text
    assert tables.TABLE_FORGET in text and tables.TABLE_TOFU not in text and tables.TABLE_MATH not in text
    assert "Extra notes" in text and "from another producer" in text and "Extra table" in text
    assert (tmp_path / "partial" / "tables" / "extra_table.csv").read_text().splitlines() == ["a", "1", "2"]
    assert "http://mlflow:8080/#/experiments/" in text
    assert "figure3" not in text  # no TOFU curve: Figure 3 is skipped, not drawn half-empty
    leaves = pl.read_csv(tmp_path / "partial" / "leaves.csv")  # no math, no TOFU, no score logged: empty cells
    assert leaves.height == 6 * 4 and leaves["forget_score"].null_count() == 0  # derived from forget/all_logp
    for column in ("math_acc_start", "math_acc_end", "tofu_utility", "re_distance_end"):
        assert leaves[column].null_count() == leaves.height, column
    assert "closed-form divergence beats the bound" in text and "Theory grid" in text
    assert text.index("Theory (Section 3)") < text.index("Extra notes")

    monkeypatch.setitem(sys.modules, "reteq.theory.report", _theory_module(RuntimeError("grid missing")))

    client = MlflowClient(uri)
    exp = client.create_experiment("bare", artifact_location=artifacts)
    client.create_run(exp, tags={T.TAG_KIND: T.KIND_SWEEP, T.TAG_SWEEP: "bare"})
    text = _text(report.write_report(uri, "bare", tmp_path / "bare").read_text(encoding="utf-8"))
    assert "Runs in the experiment: 1 sweep." in text
    assert "No unlearning metrics were logged in this experiment" in text
    assert "Divergence could not be measured" in text
    assert "The recency effect could not be judged" in text
    assert "No figure has data" in text
    assert "data:image/png" not in text
    assert "The theory section failed: RuntimeError: grid missing" in text
    assert pl.read_csv(tmp_path / "bare" / "leaves.csv").columns[:3] == ["run_id", "model", "method"]  # no leaf
    assert "none here" in text
