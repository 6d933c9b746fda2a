"""Figures 4 (R/C/U depth) and 7 (forget vs utility) from a tidy metrics frame with known content."""

from __future__ import annotations

import polars as pl

from reteq import tracking as T
from reteq.analysis.charts import figure4, figure7, save_chart


def _frame(rows):
    return pl.DataFrame(rows, schema={"run_id": pl.String, "model": pl.String, "order": pl.String,
                                      "p": pl.Int64, "algorithm": pl.String, "lr": pl.Float64,
                                      "step": pl.Int64, "metric": pl.String, "value": pl.Float64},
                        orient="row")


def test_figure4_draws_r_c_u_per_order(tmp_path):
    rows = []
    for i, order in enumerate(["R>C>U", "U>C>R"]):
        for step in range(3):
            for key, base in ((T.M_DEPTH_R, -1.0), (T.M_DEPTH_C, -2.0), (T.M_DEPTH_U, -3.0)):
                rows.append((f"r{i}", "tiny", order, 3, "ga", 5e-5, step, key, base - step * (i + 1)))
    chart = figure4(_frame(rows))
    assert chart is not None
    spec = chart.to_dict()
    assert spec["spec"]["encoding"]["color"]["title"] == "response"
    _, png = save_chart(chart, tmp_path, "figure4")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 2000
    assert figure4(_frame([])) is None


def test_figure7_uses_the_last_step_and_prefers_lr_5e_5(tmp_path):
    rows = []
    for p in (1, 2, 3, 4):
        for lr in (1e-5, 5e-5):
            for step, (f, u) in enumerate([(0.0, 1.0), (p * 1.0, 1 - p / 10)]):
                rows.append((f"{p}-{lr}", "tiny", "x", p, "npo", lr, step, T.M_FORGET_SCORE, f))
                rows.append((f"{p}-{lr}", "tiny", "x", p, "npo", lr, step, T.M_TOFU_UTILITY, u))
    chart = figure7(_frame(rows))
    data = pl.DataFrame(chart.data)
    assert set(data["lr"]) == {5e-5} and sorted(data["forget"]) == [1.0, 2.0, 3.0, 4.0]
    _, png = save_chart(chart, tmp_path, "figure7")
    assert png.read_bytes()[:4] == b"\x89PNG"
