"""docs/results_smol.md states the counts of docs/results_smol/leaves.csv (written by `reteq report`, issue 29):
the counts line and Finding 4's per-lr forget-score tables are recomputed here from the file, so the prose cannot
drift from the data it reports."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from reteq.analysis import recency_stats as RS

ROOT = Path(__file__).resolve().parents[1]
LEAVES = ROOT / "docs" / "results_smol" / "leaves.csv"
DOC = ROOT / "docs" / "results_smol.md"
PAPER_METHODS = ("ga", "npo", "simnpo")  # their Table 1 is laid out by column, the others' Finding 4 tables by row


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
    # methods grouped by their design: the seeds of each lr (a slice may have run some seeds of an lr so far)
    designs: dict[tuple, list[str]] = {}
    for method in sorted(complete["method"].unique()):
        mine = cells.filter(pl.col("method") == method)
        seeds_per_lr = tuple(sorted((lr, mine.filter(pl.col("lr") == lr).height) for lr in mine["lr"].unique()))
        designs.setdefault(seeds_per_lr, []).append(method)
    groups = "; ".join(f"{', '.join(ms)} at {_design(d)}" for d, ms in sorted(
        designs.items(), key=lambda kv: (-len(kv[0]), -sum(n for _, n in kv[0]))))
    return (f"leaves.csv: {done.height} leaves, p 1..{last}, {complete.height} of them in complete cells: {groups}; "
            f"p = {last} forgets least in {cells['last'].sum()} of {cells.height} cells (method x lr x seed) and has "
            f"the lowest seed mean in {settings['last'].sum()} of {settings.height} settings (method x lr)")


def _design(seeds_per_lr: tuple[tuple[float, int], ...]) -> str:
    """'5 seeds x 3 lrs (0.0001, 0.0003, 0.001)' when every lr has the same seeds, else each lr with its seeds:
    '5 seeds at 0.001, 2 seeds at 0.0003' (most seeds first)."""
    counts = {n for _, n in seeds_per_lr}
    if len(counts) == 1:
        return f"{counts.pop()} seeds x {len(seeds_per_lr)} lrs ({', '.join(f'{lr:g}' for lr, _ in seeds_per_lr)})"
    return ", ".join(f"{n} seeds at {lr:g}" for lr, n in sorted(seeds_per_lr, key=lambda x: (-x[1], x[0])))


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


def test_the_counts_line_states_a_partly_run_lr():
    # seeds 3 and 4 of WGA at a second lr: WGA's design is 5 seeds at one lr and 2 at the other, said as such
    # (built from WGA's lr 1e-3 rows alone, so the committed file's own WGA lrs do not change what is planted)
    leaves = pl.read_csv(LEAVES).filter((pl.col("method") == "wga") & (pl.col("lr") == 1e-3))
    extra = leaves.filter(pl.col("seed") >= 3).with_columns(pl.lit(3e-4).alias("lr"))
    line = counts_line(pl.concat([leaves, extra]))
    assert "wga at 5 seeds at 0.001, 2 seeds at 0.0003" in line, line


def forget_cells(leaves: pl.DataFrame, method: str, lr: float) -> str:
    """Finding 4's cells for one (method, lr): 'mean ± 95% t half-width' per p = 1..4, the lowest in bold."""
    iv = RS.per_p_intervals(leaves.filter((pl.col("method") == method) & (pl.col("lr") == lr))).sort("p")
    cells = [f"{r['mean']:.3f} ± {r['ci_high'] - r['mean']:.3f}" for r in iv.iter_rows(named=True)]
    lowest = iv["mean"].arg_min()
    cells[lowest] = f"**{cells[lowest]}**"
    return " | ".join(cells)


def _complete_settings(leaves: pl.DataFrame) -> list[tuple[str, float]]:
    cells = leaves.group_by("method", "lr", "seed").agg(pl.col("p").n_unique().alias("n_p"))
    done = cells.filter(pl.col("n_p") == 4).group_by("method", "lr").agg(pl.len().alias("seeds"))
    return sorted((m, lr) for m, lr, n in done.iter_rows() if n >= 5 and m not in PAPER_METHODS)


def test_finding_4_tables_state_the_forget_scores_of_leaves_csv():
    leaves = pl.read_csv(LEAVES)
    doc = DOC.read_text()
    settings = _complete_settings(leaves)
    assert len(settings) >= 10
    missing = [f"{m} {lr:g}: | {forget_cells(leaves, m, lr)} |" for m, lr in settings
               if f"| {forget_cells(leaves, m, lr)} |" not in doc]
    assert not missing, "docs/results_smol.md should state, recomputed from leaves.csv:\n" + "\n".join(missing)


def test_finding_4_cells_see_a_planted_change():
    leaves = pl.read_csv(LEAVES)
    method, lr = _complete_settings(leaves)[0]
    planted = leaves.with_columns(pl.when((pl.col("method") == method) & (pl.col("lr") == lr) & (pl.col("p") == 1))
                                  .then(pl.col("forget_score") + 0.01).otherwise(pl.col("forget_score"))
                                  .alias("forget_score"))
    assert f"| {forget_cells(planted, method, lr)} |" not in DOC.read_text()
