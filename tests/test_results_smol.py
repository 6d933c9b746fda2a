"""docs/results_smol.md states the counts of docs/results_smol/leaves.csv (written by `reteq report`, issue 29):
the counts line is recomputed here from the file, so the prose cannot drift from the data it reports."""

from __future__ import annotations

from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
LEAVES = ROOT / "docs" / "results_smol" / "leaves.csv"
DOC = ROOT / "docs" / "results_smol.md"


def counts_line(leaves: pl.DataFrame) -> str:
    """The doc's one-line summary of leaves.csv: its design and how often the last-learned order forgets least."""
    done = leaves.filter(pl.col("status") == "done")
    last = done["p"].max()
    seeds, methods = sorted(done["seed"].unique()), sorted(done["method"].unique())
    lrs = sorted(done["lr"].unique())
    cells = done.group_by("method", "lr", "seed").agg(
        pl.col("p").n_unique().alias("n_p"),
        (pl.col("forget_score").filter(pl.col("p") == last).first() == pl.col("forget_score").min()).alias("last"))
    cells = cells.filter(pl.col("n_p") == last)
    means = done.group_by("method", "lr", "p").agg(pl.col("forget_score").mean())
    settings = means.group_by("method", "lr").agg(
        (pl.col("forget_score").filter(pl.col("p") == last).first() == pl.col("forget_score").min()).alias("last"))
    return (f"leaves.csv: {done.height} leaves = {len(seeds)} seeds x p 1..{last} x {len(methods)} methods "
            f"({', '.join(methods)}) x {len(lrs)} lrs ({', '.join(f'{lr:g}' for lr in lrs)}); p = {last} forgets "
            f"least in {cells['last'].sum()} of {cells.height} cells (method x lr x seed) and has the lowest seed "
            f"mean in {settings['last'].sum()} of {settings.height} settings (method x lr)")


def test_the_doc_states_the_counts_of_leaves_csv():
    leaves = pl.read_csv(LEAVES)
    assert {"method", "p", "seed", "lr", "forget_score", "label_logp_start", "math_acc_start"} <= set(leaves.columns)
    line = counts_line(leaves)
    assert line in DOC.read_text(), f"docs/results_smol.md should state, recomputed from leaves.csv:\n{line}"


def test_the_counts_line_sees_a_planted_change(tmp_path):
    leaves = pl.read_csv(LEAVES)
    planted = leaves.with_columns(pl.when(pl.col("p") == leaves["p"].max()).then(1e9)
                                  .otherwise(pl.col("forget_score")).alias("forget_score"))
    assert counts_line(planted) != counts_line(leaves)
    assert counts_line(planted) not in DOC.read_text()
