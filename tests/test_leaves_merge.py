"""`reteq report --leaves-merge`: a design run slice by slice (each session or machine with its own store) adds its
leaves to one leaves.csv. Checked on the committed docs/results_smol/leaves.csv: split and merged back it is the
same table; a leaf in both takes the new row; a file whose start checkpoints measured something else is refused."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from reteq.analysis.leaves import LEAF_IDENTITY, ROW_ORDER, merge_leaves

LEAVES = Path(__file__).resolve().parents[1] / "docs" / "results_smol" / "leaves.csv"


@pytest.fixture(scope="module")
def leaves() -> pl.DataFrame:
    return pl.read_csv(LEAVES, infer_schema_length=None)


def test_a_split_merges_back_to_the_same_table(leaves):
    earlier = leaves.filter(pl.col("method").is_in(["ga", "npo", "simnpo"]) | (pl.col("seed") < 2))
    later = leaves.filter(~(pl.col("method").is_in(["ga", "npo", "simnpo"]) | (pl.col("seed") < 2)))
    assert earlier.height and later.height
    merged = merge_leaves(earlier, later, "earlier.csv")
    assert merged.height == leaves.height
    assert merged.equals(leaves.sort(ROW_ORDER, nulls_last=True))


def test_a_leaf_in_both_takes_the_new_row(leaves):
    new = leaves.head(3).with_columns(pl.lit("rerun").alias("run_id"), (pl.col("forget_score") + 1).alias("forget_score"))
    merged = merge_leaves(leaves, new, "leaves.csv")
    assert merged.height == leaves.height
    again = merged.join(new.select(LEAF_IDENTITY), on=LEAF_IDENTITY, nulls_equal=True)
    assert again["run_id"].to_list() == ["rerun"] * 3
    assert sorted(again["forget_score"].to_list()) == sorted(new["forget_score"].to_list())


def test_another_design_under_the_same_leaves_is_refused(leaves):
    # the stage nodes changed (say, a new stage lr): the same (model, seed, order) measures another step-0 label
    moved = leaves.filter(pl.col("method") == "wga").with_columns(pl.col("label_logp_start") - 0.5)
    with pytest.raises(ValueError, match=r"^leaves\.csv: label_logp_start: the start checkpoint \(smollm2-135m, "):
        merge_leaves(leaves.filter(pl.col("method") != "wga"), moved, "leaves.csv")
    with pytest.raises(ValueError, match=r"^old\.csv: columns: .*forget_score"):
        merge_leaves(leaves.drop("forget_score"), leaves, "old.csv")


def test_a_store_that_never_filled_a_knob_merges_with_the_knobs_type(leaves, tmp_path):
    # this store ran WGA only: the knobs of other methods are empty columns, which a CSV reads back as text
    only = tmp_path / "wga.csv"
    leaves.filter(pl.col("method") == "wga").write_csv(only)
    new = pl.read_csv(only, infer_schema_length=None)
    assert new.schema["retain_weight"] == pl.String and leaves.schema["retain_weight"] == pl.Float64
    merged = merge_leaves(leaves.filter(pl.col("method") != "wga"), new, "leaves.csv")
    assert merged.schema == leaves.schema and merged.equals(leaves.sort(ROW_ORDER, nulls_last=True))
