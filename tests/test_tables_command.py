"""`reteq tables`: a leaves.csv's tables as Markdown; bad input is one line naming the file and field, before
anything is written, and the output is written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from helpers import tmpfs

from reteq.analysis import leaves_markdown as M
from reteq.cli import main

LEAVES = Path(__file__).resolve().parents[1] / "docs" / "results_smol" / "leaves.csv"


@pytest.fixture(scope="module")
def leaves() -> pl.DataFrame:
    return pl.read_csv(LEAVES, infer_schema_length=None)


def test_writes_the_tables_to_a_file(tmp_path, capsys):
    out = tmp_path / "deep" / "tables.md"
    assert main(["tables", str(LEAVES), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(f"# Every table of {LEAVES}")
    assert "## Equal forgetting (forget score 1.0)" in text and "## Forget scores at lr 0.001" in text
    assert [p.name for p in out.parent.iterdir()] == ["tables.md"]  # no temp file left
    assert "tables: " in capsys.readouterr().out


def test_forget_target_moves_equal_forgetting(tmp_path):
    out = tmp_path / "t.md"
    assert main(["tables", str(LEAVES), "--out", str(out), "--forget-target", "0.5"]) == 0
    assert "| method | lr where p = 1 reaches 0.5 |" in out.read_text()


def _write(tmp_path: Path, frame: pl.DataFrame) -> Path:
    path = tmp_path / "leaves.csv"
    frame.write_csv(path)
    return path


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such file"),
    ("no_column", "forget_score: column missing"),
    ("text_p", "p: not numeric"),
    ("none_done", "status: no leaf is 'done'"),
    ("garbage", "not a readable CSV"),
])
def test_bad_leaves_is_one_line_and_writes_nothing(tmp_path, capsys, leaves, case, needle):
    path = tmp_path / "leaves.csv"
    if case == "no_column":
        _write(tmp_path, leaves.drop("forget_score"))
    elif case == "text_p":
        _write(tmp_path, leaves.with_columns(pl.lit("four").alias("p")))
    elif case == "none_done":
        _write(tmp_path, leaves.with_columns(pl.lit("collapsed").alias("status")))
    elif case == "garbage":
        path.write_bytes(b"\xff\xfe\x00garbage\n\x00\x01,\"unclosed\n")
    out = tmp_path / "tables.md"
    assert main(["tables", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and needle in err, err
    assert not out.exists()


def test_a_file_over_the_bound_is_refused(tmp_path, capsys, monkeypatch):
    from reteq.commands import tables
    monkeypatch.setattr(tables, "MAX_BYTES", 100)
    assert main(["tables", str(LEAVES)]) == 2
    assert "more than the 100 a leaves.csv may have" in capsys.readouterr().err


def test_a_full_disk_leaves_the_old_file_and_no_temp_file(tmp_path, capsys):
    with tmpfs(tmp_path / "mnt", "size=8k") as mnt:  # room for the old file, not for the new one (~30 kB)
        out = mnt / "tables.md"
        out.write_text("old\n")
        assert main(["tables", str(LEAVES), "--out", str(out)]) == 1
        assert out.read_text() == "old\n"
        assert [p.name for p in mnt.iterdir()] == ["tables.md"]
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "disk full" in err and len(err.splitlines()) == 1, err


def test_one_seed_and_a_missing_order_render_without_intervals(leaves):
    # one seed: no interval and no test ("–"); WGA at lr 1e-3 without p = 2: its row still has every column
    part = leaves.filter((pl.col("method") == "wga") & (pl.col("lr") == 1e-3) & (pl.col("seed") == 0)
                         & (pl.col("p") != 2))
    text = M.forget_table(pl.concat([part, leaves.filter((pl.col("method") == "ga") & (pl.col("lr") == 1e-3))]),
                          1e-3)
    wga = next(r for r in M.table_rows(text) if r.startswith("| WGA |"))
    assert wga.count("|") == text.splitlines()[0].count("|")
    assert " – |" in wga and "±" not in wga, wga
    assert "0 of 0" in wga  # no seed has every p


def test_a_slice_with_one_seed_renders_every_table(leaves):
    # a slice cut off after its first seed: no interval, no t-test, every table still drawn ("–" where none)
    text = M.render(leaves.filter(pl.col("seed") == 0), "one-seed.csv")
    tests = M.table_rows(text.split("## Paired tests")[1].split("##")[0])
    assert tests and all(r.endswith(" | 1 | – | 1 | no |") for r in tests), tests[:2]  # sign-flip: 2/2^1


def test_identical_methods_are_found_and_different_ones_are_not(leaves):
    text = M.identical_pairs_table(leaves)
    rows = M.table_rows(text)
    assert [r.split(" | ")[:2] for r in rows] == [["| GradDiff", "GA"], ["| NPO+RT", "NPO"]], rows
    nudged = leaves.with_columns(pl.when((pl.col("method") == "graddiff") & (pl.col("seed") == 4) & (pl.col("p") == 4))
                                 .then(pl.col("forget_score") + 1e-9).otherwise(pl.col("forget_score"))
                                 .alias("forget_score"))
    assert not any(r.startswith("| GradDiff |") for r in M.table_rows(M.identical_pairs_table(nudged)))
