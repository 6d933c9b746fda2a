"""docs/results_smol.md states the counts of docs/results_smol/leaves.csv (written by `reteq report`, issue 29):
the counts line is recomputed here from the file, so the prose cannot drift from the data it reports."""

from __future__ import annotations

from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
LEAVES = ROOT / "docs" / "results_smol" / "leaves.csv"
DOC = ROOT / "docs" / "results_smol.md"


def counts_line(leaves: pl.DataFrame) -> str:
    """The doc's one-line summary of leaves.csv: its design (methods grouped by their seeds and lrs, counting only
    complete cells: a (method, lr, seed) with every p) and how often the last-learned order forgets least."""
    done = leaves.filter(pl.col("status") == "done")
    last = done["p"].max()
    n_p = done.group_by("method", "lr", "seed").agg(pl.col("p").n_unique().alias("n_p"))
    complete = done.join(n_p.filter(pl.col("n_p") == last), on=["method", "lr", "seed"])
    cells = complete.group_by("method", "lr", "seed").agg(
        (pl.col("forget_score").filter(pl.col("p") == last).first() == pl.col("forget_score").min()).alias("last"))
    means = complete.group_by("method", "lr", "p").agg(pl.col("forget_score").mean())
    settings = means.group_by("method", "lr").agg(
        (pl.col("forget_score").filter(pl.col("p") == last).first() == pl.col("forget_score").min()).alias("last"))
    designs: dict[tuple, list[str]] = {}
    for method in sorted(complete["method"].unique()):
        mine = cells.filter(pl.col("method") == method)
        lrs = tuple(sorted(mine["lr"].unique()))
        seeds = min(mine.filter(pl.col("lr") == lr).height for lr in lrs)
        designs.setdefault((seeds, lrs), []).append(method)
    groups = "; ".join(f"{', '.join(ms)} at {seeds} seeds x {len(lrs)} lrs ({', '.join(f'{lr:g}' for lr in lrs)})"
                       for (seeds, lrs), ms in sorted(designs.items(), key=lambda kv: (-len(kv[0][1]), -kv[0][0])))
    return (f"leaves.csv: {done.height} leaves, p 1..{last}, {complete.height} of them in complete cells: {groups}; "
            f"p = {last} forgets least in {cells['last'].sum()} of {cells.height} cells (method x lr x seed) and has "
            f"the lowest seed mean in {settings['last'].sum()} of {settings.height} settings (method x lr)")


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
