"""One row per unlearning leaf: the file anyone can recompute every table of a sweep from (leaves.csv).

A leaf's identity (model, method, its knobs, lr, scheduler, seed, order, p) and, for each evaluation metric, its
value where unlearning started (the first logged step, step 0) and where it ended (the last logged step: a
collapsed run stops early). The forget score, TOFU utility and math utility are the ones Table 1 averages
(logged, or derived from their raw metric exactly as reteq.analysis.tables does). A metric a leaf never logged
(math evaluated only at the ends, or not at all; no θ_r) is an empty cell, never an error; a leaf whose run
finished without metrics still has its row.

Columns: run_id (the MLflow run); model, method, params (the knobs, canonical "beta=0.5"), one column per knob
name, lr, scheduler (the finetuning schedule), seed, order ("inst>tofu>math>U"), p, status (done | collapsed);
last_step; forget_score (mean log-prob of the label and paraphrases at step 0 minus at the last step, nats/token;
higher = more forgetting); label_logp, paraphrase_logp, all_logp (forget targets), tofu_logp (knowledge answers),
math_acc (fraction of right '####' answers), re_distance (re/logp_mse to theta_r), re_kl, each _start and _end;
tofu_utility (1 - |tofu_logp change|) and math_utility (math_acc change) at the last step.
"""

from __future__ import annotations

import polars as pl

from reteq import tracking as T
from reteq.analysis.divergence import forget_scores
from reteq.analysis.load import KNOB_COLUMNS
from reteq.analysis.tables import derived_utility

FILE = "leaves.csv"
IDENTITY = ["run_id", "model", "method", "params", *KNOB_COLUMNS, "beta", "lr", "scheduler", "seed", "order", "p",
            "status"]
# (column stem, metric key): <stem>_start and <stem>_end
START_END = (
    ("label_logp", T.M_FORGET_LABEL),
    ("paraphrase_logp", T.M_FORGET_PARAPHRASE),
    ("all_logp", T.M_FORGET_ALL),
    ("tofu_logp", T.M_TOFU_LOGP),
    ("math_acc", T.M_MATH_ACC),
    ("re_distance", T.M_RE_LOGP_MSE),
    ("re_kl", T.M_RE_KL),
)
# (column, metric key or derived table): the value at the last logged step only
FINAL = (("forget_score", T.M_FORGET_SCORE), ("tofu_utility", T.M_TOFU_UTILITY), ("math_utility", T.M_MATH_UTILITY))
COLUMNS = [*IDENTITY, "last_step", "forget_score", *[f"{s}_{e}" for s, _ in START_END for e in ("start", "end")],
           "tofu_utility", "math_utility"]
# a leaf's identity across stores (run_id is one store's); leaves of one design share it, so a slice run elsewhere
# replaces or adds rows by it (merge_leaves)
LEAF_IDENTITY = ["model", "method", "params", "lr", "scheduler", "seed", "order"]
# what a leaf measured at step 0 depends on its start checkpoint alone (model, seed, order), not on the method or lr:
# two files whose leaves started from the same checkpoint agree on it, and disagree when the design moved under them
START_CHECKPOINT = ["model", "seed", "order"]
ROW_ORDER = ["model", "method", "params", "lr", "scheduler", "p", "seed"]  # a design's table reads by method, lr, p
START_METRICS = ("label_logp_start", "tofu_logp_start", "math_acc_start")
START_TOLERANCE = 1e-4  # nats/token: bf16 scoring of the same checkpoint in another process is bit-equal in practice
REQUIRED = ("method", "p", "seed", "lr", "forget_score", "label_logp_start", "label_logp_end", "tofu_utility",
            "math_acc_start", "math_acc_end", "re_distance_end")  # the minimum (tests check it)


def leaves_table(runs: pl.DataFrame, metrics: pl.DataFrame) -> pl.DataFrame:
    """Every unlearning run of `runs` (reteq.analysis.load.load_runs), one row each, COLUMNS in order; sorted by
    model, method, params, lr, scheduler, p, seed."""
    leaves = runs.filter(pl.col("kind") == T.KIND_UNLEARN).rename({"algorithm": "method"})
    leaves = leaves.select([c for c in IDENTITY if c in leaves.columns])
    values = metrics.drop_nulls("value").filter(pl.col("value").is_finite()) if metrics.height else metrics
    ends = _ends(values, {key: stem for stem, key in START_END})
    if ends is not None:
        leaves = leaves.join(ends, on="run_id", how="left")
    finals = [forget_scores(values)[0], *(derived_utility(values, key)[0] for _, key in FINAL[1:])]
    for (column, _), frame in zip(FINAL, finals):
        last = (frame.drop_nulls("value").sort("step").group_by("run_id", maintain_order=True)
                .agg(pl.col("value").last().alias(column)))
        leaves = leaves.join(last, on="run_id", how="left")
    steps = values.group_by("run_id").agg(pl.col("step").max().alias("last_step")) if values.height else None
    if steps is not None:
        leaves = leaves.join(steps, on="run_id", how="left")
    dtypes = {**{c: pl.Float64 for c in COLUMNS}, **{c: runs.schema.get(c, pl.String) for c in IDENTITY},
              "method": pl.String, "last_step": pl.Int64}
    leaves = leaves.with_columns(pl.lit(None, dtype=dtypes[c]).alias(c) for c in COLUMNS if c not in leaves.columns)
    return leaves.select(COLUMNS).sort(ROW_ORDER, nulls_last=True)


def _ends(values: pl.DataFrame, stems: dict[str, str]) -> pl.DataFrame | None:
    """Per run: <stem>_start and <stem>_end of each metric it logged (wide)."""
    part = values.filter(pl.col("metric").is_in(list(stems))) if values.height else values
    if not part.height:
        return None
    agg = (part.sort("step").group_by("run_id", "metric", maintain_order=True)
           .agg(start=pl.col("value").first(), end=pl.col("value").last())
           .with_columns(pl.col("metric").replace_strict(stems)))
    wide = agg.pivot(on="metric", index="run_id", values=["start", "end"])
    # pivot names multi-value columns "<value>_<metric>": rename to "<stem>_<value>"
    return wide.rename({f"{v}_{s}": f"{s}_{v}" for s in stems.values() for v in ("start", "end")
                        if f"{v}_{s}" in wide.columns})


def merge_leaves(kept: pl.DataFrame, new: pl.DataFrame, source: str) -> pl.DataFrame:
    """`new` (this store's leaves) over `kept` (a leaves.csv from earlier stores of the same design): a leaf in both
    (LEAF_IDENTITY) takes its new row, every other leaf of either stays. So a design too long for one machine or
    session accumulates slice by slice, every row still written by `reteq report`. Refused (ValueError naming
    `source` and the field) when the columns differ or when a start checkpoint both files used measured something
    else at step 0: the stage nodes under them changed, and the rows would mix two designs."""
    if kept.columns != new.columns:
        missing = sorted(set(new.columns) ^ set(kept.columns)) or ["(column order)"]
        raise ValueError(f"{source}: columns: not this reteq's leaves.csv (differ in {', '.join(missing)})")
    # a column one store never filled (a knob of a method it did not run) reads back from CSV as empty text
    new = new.with_columns(pl.col(c).cast(t) for c, t in kept.schema.items()
                           if new.schema[c] != t and new[c].null_count() == new.height)
    kept = kept.with_columns(pl.col(c).cast(t) for c, t in new.schema.items()
                             if kept.schema[c] != t and kept[c].null_count() == kept.height)
    starts = [c for c in START_METRICS if c in new.columns]
    firsts = [pl.col(c).drop_nulls().first() for c in starts]
    both = (kept.group_by(START_CHECKPOINT).agg(firsts)
            .join(new.group_by(START_CHECKPOINT).agg(firsts), on=START_CHECKPOINT, suffix="_new"))
    for column in starts:
        moved = both.filter((pl.col(column) - pl.col(f"{column}_new")).abs() > START_TOLERANCE)
        if moved.height:
            row = moved.row(0, named=True)
            where = ", ".join(str(row[c]) for c in START_CHECKPOINT)
            raise ValueError(f"{source}: {column}: the start checkpoint ({where}) measured {row[column]} there and "
                             f"{row[f'{column}_new']} in this store: not the same design, refusing to merge")
    old = kept.join(new.select(LEAF_IDENTITY), on=LEAF_IDENTITY, how="anti", nulls_equal=True)
    return pl.concat([old, new], how="vertical_relaxed").sort(ROW_ORDER, nulls_last=True)
