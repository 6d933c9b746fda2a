"""docs/results_smol.md states what docs/results_smol/leaves.csv (written by `reteq report`, issue 29) says.

docs/results_smol/tables.md is `reteq tables` of leaves.csv and must be exactly what it renders today; every table
row the results page quotes must be a row of it, and its counts line must be the page's. So neither the page nor
the tables file can drift from the data they report."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from reteq.analysis.leaves_markdown import counts_line, render, table_rows

ROOT = Path(__file__).resolve().parents[1]
LEAVES = ROOT / "docs" / "results_smol" / "leaves.csv"
TABLES = ROOT / "docs" / "results_smol" / "tables.md"
DOC = ROOT / "docs" / "results_smol.md"
SOURCE = "docs/results_smol/leaves.csv"  # as `reteq tables` names it in the file it writes


def _leaves() -> pl.DataFrame:
    return pl.read_csv(LEAVES, infer_schema_length=None)


def result_section(doc: str) -> str:
    """The page's section on configs/smol_science.yaml (the first run's tables, further down, are from MLflow)."""
    return doc[doc.index("## The result"):doc.index("## The first run")]


def unquoted_rows(doc: str, tables: str) -> list[str]:
    rows = set(table_rows(tables))
    return [row for row in table_rows(result_section(doc)) if row not in rows]


def test_tables_md_is_what_reteq_tables_renders_from_leaves_csv():
    assert TABLES.read_text() == render(_leaves(), SOURCE), (
        f"rerun: reteq tables {SOURCE} --out docs/results_smol/tables.md")


def test_every_table_row_of_the_results_page_is_a_row_of_tables_md():
    doc = DOC.read_text()
    assert len(table_rows(result_section(doc))) >= 60  # the page does quote its tables
    missing = unquoted_rows(doc, TABLES.read_text())
    assert not missing, "docs/results_smol.md quotes rows that tables.md does not have:\n" + "\n".join(missing)


def test_a_changed_leaf_changes_a_quoted_row():
    # a planted +0.01 on one setting's p = 1 leaves: the page's rows no longer all come from the rendered tables
    leaves = _leaves()
    planted = leaves.with_columns(pl.when((pl.col("method") == "wga") & (pl.col("lr") == 3e-4) & (pl.col("p") == 1))
                                  .then(pl.col("forget_score") + 0.01).otherwise(pl.col("forget_score"))
                                  .alias("forget_score"))
    missing = unquoted_rows(DOC.read_text(), render(planted, SOURCE))
    assert any(row.startswith("| WGA |") for row in missing), missing


def test_a_changed_number_on_the_page_is_caught():
    doc = DOC.read_text()
    row = table_rows(result_section(doc))[-1]
    planted = doc.replace(row, row.replace("0", "9", 1))
    assert unquoted_rows(planted, TABLES.read_text()), row


def test_the_doc_states_the_counts_of_leaves_csv():
    line = counts_line(_leaves())
    assert line in DOC.read_text(), f"docs/results_smol.md should state, recomputed from leaves.csv:\n{line}"
    assert line in TABLES.read_text()


def test_the_counts_line_sees_a_planted_change():
    leaves = _leaves()
    planted = leaves.with_columns(pl.when(pl.col("p") == leaves["p"].max()).then(1e9)
                                  .otherwise(pl.col("forget_score")).alias("forget_score"))
    assert counts_line(planted) != counts_line(leaves)
    assert counts_line(planted) not in DOC.read_text()


def test_the_counts_line_states_a_partly_run_lr():
    # seeds 3 and 4 of WGA at a second lr: WGA's design is 5 seeds at one lr and 2 at the other, said as such
    # (built from WGA's lr 1e-3 rows alone, so the committed file's own WGA lrs do not change what is planted)
    leaves = _leaves().filter((pl.col("method") == "wga") & (pl.col("lr") == 1e-3))
    extra = leaves.filter(pl.col("seed") >= 3).with_columns(pl.lit(3e-4).alias("lr"))
    line = counts_line(pl.concat([leaves, extra]))
    assert "wga at 5 seeds at 0.001, 2 seeds at 0.0003" in line, line
