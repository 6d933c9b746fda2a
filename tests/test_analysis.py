"""Analysis against a real MLflow SQLite store holding a planted sweep (tests/analysis_fixtures.py).

The planted curves have known answers: the max gap across orders is G0 * exp(rate * t) per cell, p = 4 forgets
least in 6 of 8 cells, and seeds shift curves by known offsets. Each test checks the analysis recovers them.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from analysis_fixtures import CELLS, EXPERIMENT, G0, MODEL, SEED_SHIFT, STEPS, write_planted
from mlflow import MlflowClient
from mlflow.entities import Metric

from reteq import tracking as T
from reteq.analysis import charts, divergence, load, paper_numbers, tables

T_975_DF2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom
N_UNLEARN = len(CELLS) * 4


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """One planted store for the module (writing it is the slow part); same layout as sqlite_tracking."""
    root = tmp_path_factory.mktemp("planted")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    write_planted(uri, (root / "mlartifacts").as_uri())
    runs = load.load_runs(uri, EXPERIMENT)
    return uri, runs, load.load_metrics(uri, EXPERIMENT, runs=runs)


def test_load_runs_one_typed_row_per_run(planted):
    _, runs, _ = planted
    assert runs.height == 1 + 4 + N_UNLEARN
    assert runs.schema["p"] == pl.Int64 and runs.schema["seed"] == pl.Int64
    assert runs.schema["lr"] == pl.Float64 and runs.schema["beta"] == pl.Float64
    assert isinstance(runs.schema["start_time"], pl.Datetime)
    counts = dict(runs["kind"].value_counts().iter_rows())
    assert counts == {T.KIND_SWEEP: 1, T.KIND_FINETUNE: 4, T.KIND_UNLEARN: N_UNLEARN}
    parent = runs.filter(pl.col("kind") == T.KIND_SWEEP)["run_id"][0]
    assert runs.filter(pl.col("kind") != T.KIND_SWEEP)["parent_run_id"].unique().to_list() == [parent]
    ga = runs.filter(pl.col("algorithm") == "ga")
    assert ga["beta"].null_count() == ga.height  # GA's "" beta becomes null, not 0
    assert sorted(runs.filter(pl.col("kind") == T.KIND_UNLEARN)["p"].unique().to_list()) == [1, 2, 3, 4]


def test_load_metrics_tidy_and_typed(planted):
    _, _, metrics = planted
    assert tuple(metrics.columns) == load.METRIC_COLUMNS
    assert metrics.schema["step"] == pl.Int64 and metrics.schema["value"] == pl.Float64
    assert metrics["kind"].unique().to_list() == [T.KIND_UNLEARN]
    assert metrics.height == N_UNLEARN * len(STEPS) * 9  # 8 eval metrics + train/loss
    row = metrics.filter(
        (pl.col("algorithm") == "npo")
        & (pl.col("seed") == 1)
        & (pl.col("p") == 2)
        & (pl.col("metric") == T.M_FORGET_LABEL)
        & (pl.col("step") == 10)
    )
    assert row.height == 1
    assert row["value"][0] == pytest.approx(-0.5 - 0.5 + SEED_SHIFT[1] + G0 * math.exp(0.08 * 10), abs=1e-12)


def test_sqlite_fast_path_matches_client_path(planted):
    uri, runs, metrics = planted
    slow = load.load_metrics(uri, EXPERIMENT, runs=runs, sqlite_fast_path=False)
    assert slow.equals(metrics)
    finetune = load.load_metrics(uri, EXPERIMENT, kinds=(T.KIND_FINETUNE,), runs=runs)
    assert finetune.height == 4 * 10 and finetune["metric"].unique().to_list() == [T.M_TRAIN_LOSS]


def test_relogged_step_keeps_latest_value_and_unknown_experiment_fails(sqlite_tracking):
    uri, artifacts = sqlite_tracking
    client = MlflowClient(uri)
    exp = client.create_experiment("relog", artifact_location=artifacts)
    run = client.create_run(exp, tags={T.TAG_KIND: T.KIND_UNLEARN, T.TAG_P: "4", T.TAG_BETA: ""})
    client.log_batch(
        run.info.run_id,
        [
            Metric(T.M_FORGET_SCORE, 1.0, 1000, 3),
            Metric(T.M_FORGET_SCORE, 2.0, 2000, 3),
            Metric(T.M_FORGET_SCORE, float("nan"), 1000, 4),
        ],
    )
    client.set_terminated(run.info.run_id)  # only finished runs are results
    for fast in (True, False):
        m = load.load_metrics(uri, "relog", sqlite_fast_path=fast).sort("step")
        assert m["value"].to_list() == [2.0, None]
        assert m["p"].to_list() == [4, 4] and m["beta"].to_list() == [None, None]
    with pytest.raises(ValueError, match="no MLflow experiment named 'missing'"):
        load.load_runs(uri, "missing")


def test_older_runs_tagged_scheduler_still_load_their_schedule(sqlite_tracking):
    uri, artifacts = sqlite_tracking
    client = MlflowClient(uri)
    exp = client.create_experiment("renamed", artifact_location=artifacts)
    old = client.create_run(exp, tags={T.TAG_KIND: T.KIND_UNLEARN, T.TAG_SCHEDULE_BEFORE_RENAME: "cosine"})
    new = client.create_run(exp, tags={T.TAG_KIND: T.KIND_UNLEARN, T.TAG_SCHEDULE: "wsd"})
    for run in (old, new):
        client.set_terminated(run.info.run_id)  # only finished runs are results
    runs = load.load_runs(uri, "renamed")
    by_id = dict(zip(runs["run_id"].to_list(), runs["scheduler"].to_list()))
    assert by_id == {old.info.run_id: "cosine", new.info.run_id: "wsd"}
    assert T.TAG_SCHEDULE == "reteq.schedule" and T.TAG_SCHEDULE_BEFORE_RENAME == "reteq.scheduler"


def test_growth_rate_recovers_planted_rate(planted):
    _, _, metrics = planted
    div = divergence.path_divergence(metrics, (T.M_FORGET_LABEL,))
    assert div.height == len(CELLS) * len(STEPS)
    assert (div["n_orders"] == 4).all()
    np.testing.assert_allclose(div["max_gap"].to_numpy(), div["spread"].to_numpy(), rtol=1e-12)
    growth = divergence.growth_rates(div)
    assert growth.height == len(CELLS)
    for cell in CELLS:
        row = growth.filter(
            (pl.col("algorithm") == cell.algorithm)
            & (pl.col("lr") == cell.lr)
            & (pl.col("scheduler") == cell.scheduler)
            & (pl.col("seed") == cell.seed)
        )
        assert row.height == 1
        assert row["rate"][0] == pytest.approx(cell.rate, abs=1e-6)
        assert row["intercept"][0] == pytest.approx(math.log(G0), abs=1e-6)
        assert row["r2"][0] == pytest.approx(1.0, abs=1e-9) and row["grows"][0]
    summary = divergence.growth_summary(growth, T.M_FORGET_LABEL)
    assert (summary["n_cells"], summary["n_growing"], summary["share"]) == (8, 8, 1.0)
    assert summary["median_rate"] == pytest.approx(float(np.median([c.rate for c in CELLS])), abs=1e-6)


def test_recency_share_equals_planted_share(planted):
    _, _, metrics = planted
    rec = divergence.recency(metrics)
    assert rec.height == len(CELLS) and (rec["last_p"] == 4).all()
    for cell in CELLS:
        row = rec.filter(
            (pl.col("algorithm") == cell.algorithm)
            & (pl.col("lr") == cell.lr)
            & (pl.col("scheduler") == cell.scheduler)
            & (pl.col("seed") == cell.seed)
        )
        assert row["last_is_slowest"][0] == cell.recency
        assert row["rank_of_last"][0] == (1 if cell.recency else 2)
    summary = divergence.recency_summary(rec)
    assert summary == {"n_cells": 8, "n_slowest": 6, "share": 0.75}


def test_recency_uses_all_logp_when_score_missing(planted):
    _, _, metrics = planted
    scores, source = divergence.forget_scores(metrics.filter(pl.col("metric") != T.M_FORGET_SCORE))
    assert source and T.M_FORGET_ALL in source
    rec = divergence.recency(metrics.filter(pl.col("metric") != T.M_FORGET_SCORE))
    assert divergence.recency_summary(rec)["share"] == 0.75  # planted all_logp = -1 - score


def test_seed_confidence_interval(planted):
    _, _, metrics = planted
    summary = divergence.seed_summary(metrics.filter(pl.col("metric") == T.M_FORGET_LABEL))
    row = summary.filter(
        (pl.col("algorithm") == "ga")
        & (pl.col("lr") == 1e-5)
        & (pl.col("scheduler") == "wsd")
        & (pl.col("p") == 3)
        & (pl.col("step") == 10)
    )
    assert row.height == 1 and row["n"][0] == 3
    values = np.array([-0.5 - 0.5 + SEED_SHIFT[s] + 0.4 * G0 * math.exp(0.15 * 10) for s in (0, 1, 2)])
    half = T_975_DF2 * values.std(ddof=1) / math.sqrt(3)
    assert row["mean"][0] == pytest.approx(values.mean(), abs=1e-12)
    assert row["ci_low"][0] == pytest.approx(values.mean() - half, abs=1e-9)
    assert row["ci_high"][0] == pytest.approx(values.mean() + half, abs=1e-9)
    single = summary.filter((pl.col("lr") == 5e-5) & (pl.col("step") == 10) & (pl.col("p") == 1))
    assert single["n"][0] == 1 and single["ci_low"][0] is None


def test_table1_layout_and_paper_numbers(planted):
    _, _, metrics = planted
    t1 = tables.table1(metrics)
    assert list(t1) == [tables.TABLE_FORGET, tables.TABLE_TOFU, tables.TABLE_MATH]
    forget = t1[tables.TABLE_FORGET]
    assert forget["p"].to_list() == [1, 2, 3, 4]
    assert forget.columns == [
        "p",
        f"{MODEL} GA",
        f"{MODEL} GA (paper)",
        f"{MODEL} GA (cosine)",
        f"{MODEL} GA (lr=5e-05)",
        f"{MODEL} NPO",
        f"{MODEL} NPO (paper)",
    ]
    assert forget[f"{MODEL} GA"].to_list() == pytest.approx([3.1, 2.1, 2.6, 0.6])  # seed means
    assert forget[f"{MODEL} GA (paper)"].to_list() == [7.893, 5.341, 6.346, 0.178]
    assert forget[f"{MODEL} NPO (paper)"].to_list() == [1.934, 0.66, 1.215, 0.046]
    assert t1[tables.TABLE_TOFU].columns == [
        "p",
        f"{MODEL} GA",
        f"{MODEL} GA (cosine)",
        f"{MODEL} GA (lr=5e-05)",
        f"{MODEL} NPO",
    ]
    assert t1[tables.TABLE_MATH][f"{MODEL} NPO"].to_list() == pytest.approx([-0.02, -0.04, -0.06, -0.08])
    renamed = tables.table1(metrics.with_columns(model=pl.lit("tiny")))[tables.TABLE_FORGET]
    assert not any("(paper)" in c for c in renamed.columns)


def test_paper_model_names_match_case_insensitively():
    assert paper_numbers.paper_model_key("Llama-3.2-1B") == "llama-3.2-1b"
    assert paper_numbers.paper_model_key("Qwen/Qwen2.5-14B") == "qwen2.5-14b"
    assert paper_numbers.paper_model_key("llama-3.2-1b-tiny") is None
    assert paper_numbers.paper_forget_score("LLAMA-2-13B", "SimNPO", 3) == 0.531
    assert paper_numbers.paper_forget_score("qwen2.5-1.5b", "rmu", 1) is None


def test_every_chart_renders_a_png(planted, tmp_path):
    _, _, metrics = planted
    found = charts.all_charts(metrics, divergence.path_divergence(metrics))
    assert set(found) == {
        "figure1_forget_label",
        "figure3_forget_vs_tofu",
        "figure5_seeds",
        "figure6_lr_grid",
        "figure7_forget_vs_utility",
        "figure8_scheduler",
        "divergence_growth",
    }
    for name, chart in found.items():
        spec = chart.to_dict()
        assert spec["title"]["text"], name
        html_path, png_path = charts.save_chart(chart, tmp_path, name)
        png = png_path.read_bytes()
        assert png[:4] == b"\x89PNG" and len(png) > 10_000, name
        page = html_path.read_text()
        assert "cdn.jsdelivr" not in page and "vega" in page, name
    legend = found["figure1_forget_label"].to_dict()["spec"]["encoding"]["color"]
    assert legend["title"] == "p" and legend["type"] == "ordinal"


def _encodings(spec):
    """Every encoding block in a (possibly faceted or layered) vega-lite spec."""
    if isinstance(spec, dict):
        if isinstance(spec.get("encoding"), dict):
            yield spec["encoding"]
        for value in spec.values():
            yield from _encodings(value)
    elif isinstance(spec, list):
        for item in spec:
            yield from _encodings(item)


def test_every_chart_titles_its_axes_and_legends(planted):
    _, _, metrics = planted
    for name, chart in charts.all_charts(metrics, divergence.path_divergence(metrics)).items():
        encodings = list(_encodings(chart.to_dict()))
        assert encodings, name
        for enc in encodings:
            x_title = "forget score (higher = more forgetting)" if name.startswith("figure7") else "unlearning step"
            assert enc["x"]["title"] == x_title, name
            assert enc["color"]["title"] in ("p", "model"), name
            if "title" in enc["y"]:  # a layer that shares its y scale may leave the title to the other layer
                assert enc["y"]["title"], name
        assert any(enc["y"].get("title") for enc in encodings), name


def test_charts_skip_what_has_no_data(planted):
    _, _, metrics = planted
    single_seed = metrics.filter(pl.col("seed") == 0)
    assert charts.figure5(single_seed) is None  # no setting has two seeds
    only_main = tables.restrict_to_main(metrics)
    assert charts.figure6(only_main) is None and charts.figure8(only_main) is None
    empty = metrics.clear()
    assert charts.all_charts(empty, divergence.path_divergence(empty)) == {}


def test_recency_over_seeds_uses_the_seed_means_and_their_intervals(planted):
    """ga lr 1e-5: p = 4 lowest in all 3 seeds, interval clear of the others; npo: seed 2 reverses it, the mean
    still lowest but the interval overlaps; one-seed settings have no interval."""
    _, _, metrics = planted
    seeds = divergence.recency_over_seeds(metrics)
    assert seeds.height == 4
    by = {(r["algorithm"], r["lr"], r["scheduler"]): r for r in seeds.iter_rows(named=True)}
    ga = by[("ga", 1e-5, "wsd")]
    assert ga["n_seeds"] == 3 and ga["last_mean"] == pytest.approx(0.6)
    assert ga["last_ci_high"] == pytest.approx(0.6 + T_975_DF2 * 0.1 / math.sqrt(3))
    assert ga["last_is_slowest"] and ga["last_is_separated"]
    npo = by[("npo", 1e-5, "wsd")]
    assert npo["last_is_slowest"] and npo["last_is_separated"] is False
    assert by[("ga", 5e-5, "wsd")]["last_is_separated"] is None
    assert not by[("ga", 1e-5, "cosine")]["last_is_slowest"]


def test_table1_gets_seed_intervals_and_the_findings_compare_with_the_paper(planted):
    from reteq.analysis import report, tables

    _, runs, metrics = planted
    ci = tables.table1_intervals(metrics)
    assert ci["p"].to_list() == [1, 2, 3, 4]
    cell = ci.filter(pl.col("p") == 4)["llama-3.2-1b GA"][0]
    assert cell == f"0.600 ± {T_975_DF2 * 0.1 / math.sqrt(3):.3f} (n=3)"
    one_seed = metrics.filter(pl.col("seed") == 0)
    assert tables.table1_intervals(one_seed) is None
    text = report.findings(runs, metrics, divergence.growth_rates(divergence.path_divergence(metrics)),
                           divergence.recency(metrics), divergence.recency_over_seeds(metrics))[0]
    assert "the paper says p = 4 forgets slowest in 14 of 15 cells (its Table 1 as printed: lowest in 13 of 15)" \
        in text
    assert "lowest mean forget score in 3 of 4 settings" in text and "every other order's in 1 of 4" in text
