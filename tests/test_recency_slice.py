"""A 2-seed x 2-position x 2-method slice of configs/smol_science.yaml's design, on the tiny built-in model through
a real sweep (Ray Tune + MLflow) and `reteq report --leaves-out`: leaves.csv has one row per leaf with the issue's columns,
and the recency statistics in the report agree with leaves.csv recomputed by hand."""

from __future__ import annotations

import math

import polars as pl
import pytest

from reteq.analysis import recency_stats as R
from reteq.analysis import report
from reteq.analysis.leaves import REQUIRED
from reteq.analysis.page import slug
from reteq.cli import main
from reteq.commands.sweep import run_sweep
from reteq.config import parse_config
from reteq.plan import build_plan
from tests.sweep_configs import tiny_sweep

pytestmark = pytest.mark.ray


def test_two_seed_slice_writes_leaves_csv_and_consistent_statistics(ray_cluster, tmp_path):
    # U and one retain stage: 4 stage nodes per seed (U, U>tofu, tofu, tofu>U), p = 1, 2; TOFU and math evaluated
    raw = tiny_sweep(tmp_path / "work", name="slice", retain=("tofu",), positions=(1, 2), algorithms=("ga", "npo"),
                     lrs=(3e-3,), workers=1, deepspeed="zero0_fp32.json")
    raw["seeds"] = [0, 1]
    # batches of 4 of the 8 rows: each seed's shuffle makes other batches, so the seeds' scores differ (with one
    # batch of all 8 rows and no adapter to initialise, two seeds train identical models: a degenerate pairing)
    for part in (*raw["stages"], raw["unlearn"]):
        part["global_batch"] = 4
    cfg = parse_config(raw)
    assert len(build_plan(cfg).leaves) == 2 * 2 * 2
    outcome = run_sweep(cfg, report=False)
    assert outcome.code == 0, outcome
    # `reteq report` writes leaves.csv beside report.html and copies it where --leaves-out says
    copy = tmp_path / "docs" / "results_smol" / "leaves.csv"
    assert main(["report", "--experiment", "slice", "--work-dir", str(tmp_path / "work"),
                 "--leaves-out", str(copy)]) == 0

    out = tmp_path / "work" / "report"
    assert copy.read_bytes() == (out / "leaves.csv").read_bytes()
    leaves = pl.read_csv(out / "leaves.csv")
    assert set(REQUIRED) <= set(leaves.columns)
    assert leaves.height == 8
    assert sorted(leaves.select("method", "p", "seed").rows()) == sorted(
        (m, p, s) for m in ("ga", "npo") for p in (1, 2) for s in (0, 1))
    for column in ("forget_score", "label_logp_start", "label_logp_end", "tofu_utility", "math_acc_start",
                   "math_acc_end", "re_distance_end"):
        assert leaves[column].null_count() == 0, column  # every metric the slice evaluates is in every row
    assert leaves["last_step"].to_list() == [2] * 8 and (leaves["lr"] == 3e-3).all()

    # the report's statistics are those of leaves.csv: recompute the paired comparison by hand
    tests = pl.read_csv(out / "tables" / f"{slug(report.TABLE_STATS_TESTS)}.csv")
    assert tests.height == 2 and tests["last_p"].to_list() == [2, 2] and tests["other_p"].to_list() == [1, 1]
    for row in tests.iter_rows(named=True):
        mine = leaves.filter(pl.col("method") == row["method"])
        by = {(p, s): v for p, s, v in mine.select("p", "seed", "forget_score").rows()}
        d = [by[(2, s)] - by[(1, s)] for s in (0, 1)]
        assert row["n_pairs"] == 2 and row["mean_diff"] == pytest.approx(sum(d) / 2, abs=1e-9)
        t, p = R.paired_t(d)
        assert d[0] != d[1] and math.isfinite(t), d  # the seeds differ, so the paired test is not degenerate
        assert row["t"] == pytest.approx(t) and row["t_pvalue"] == pytest.approx(p)
        assert row["signflip_pvalue"] == pytest.approx(R.sign_flip_p(d))  # 2 of 4, or 4 of 4 when d's signs differ
        means = {q: mine.filter(pl.col("p") == q)["forget_score"].mean() for q in (1, 2)}
        assert row["last_is_lowest"] == (means[2] < means[1])
    intervals = pl.read_csv(out / "tables" / f"{slug(report.TABLE_STATS_INTERVALS)}.csv")
    assert intervals.height == 4 and (intervals["n_seeds"] == 2).all()
    page = (out / "report.html").read_text(encoding="utf-8")
    assert report.STATS_TITLE in page and "paired by seed" in page

    # --leaves-merge: a file from another store of the design (here seed 1's leaves at another lr, from the same
    # start checkpoints) keeps its rows and gains this store's; one whose start checkpoints measured something else
    # (another design) is refused with one line, and the file is left as it was, no temp file beside it
    earlier = tmp_path / "earlier.csv"
    elsewhere = leaves.filter(pl.col("seed") == 1).with_columns(pl.lit(1e-3).alias("lr"), pl.lit("x").alias("run_id"))
    elsewhere.write_csv(earlier)
    report_args = ["report", "--experiment", "slice", "--work-dir", str(tmp_path / "work"), "--leaves-out",
                   str(earlier), "--leaves-merge"]
    assert main(report_args) == 0
    merged = pl.read_csv(earlier)
    assert merged.height == 12 and sorted(merged["lr"].unique().to_list()) == [1e-3, 3e-3]
    assert merged.filter(pl.col("lr") == 3e-3).drop("run_id").equals(leaves.drop("run_id"))
    elsewhere.with_columns(pl.col("label_logp_start") - 1).write_csv(earlier)
    before = earlier.read_bytes()
    assert main(report_args) == 2
    assert earlier.read_bytes() == before and [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []
