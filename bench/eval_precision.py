"""What bf16 evaluation changes: the same unlearning runs scored under bf16 and under fp32 (issue #28).

configs/smol.yaml (eval.dtype bf16) and configs/ablations/smol_eval_fp32.yaml (eval.dtype fp32) share their
stage nodes and train every leaf identically (bf16 training, same seeds), so each metric's difference between
the two experiments, at the same (order, method, seed, step), is the evaluation precision's alone. Printed: the
largest absolute difference per metric (and where), the final forget score per (method, p) under both, and
whether any recency verdict (p = 4 forgets least) or rank of p flips.

    reteq sweep configs/smol.yaml && reteq sweep configs/ablations/smol_eval_fp32.yaml
    python bench/eval_precision.py                      # runs/smol's store, experiments smol and smol-eval-fp32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from reteq import tracking as T  # noqa: E402
from reteq.analysis.load import load_metrics  # noqa: E402
from reteq.analysis.tables import final_table  # noqa: E402

IDENTITY = ["model", "order", "p", "algorithm", "lr", "params", "seed", "step", "metric"]


def final_forget(metrics: pl.DataFrame) -> pl.DataFrame:
    """Seed-mean final forget score per (algorithm, p)."""
    return (final_table(metrics).filter(pl.col("metric") == T.M_FORGET_SCORE)
            .select("algorithm", "params", "p", "mean", "n_seeds"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="runs/smol")
    p.add_argument("--bf16", default="smol", help="the experiment evaluated in bf16")
    p.add_argument("--fp32", default="smol-eval-fp32", help="the experiment evaluated in fp32")
    args = p.parse_args()
    uri = f"sqlite:///{Path(args.work_dir).resolve() / 'mlflow.db'}"
    frames = {name: load_metrics(uri, exp) for name, exp in (("bf16", args.bf16), ("fp32", args.fp32))}
    keep = IDENTITY + ["value"]
    both = (frames["bf16"].select(keep).rename({"value": "bf16"})
            .join(frames["fp32"].select(keep).rename({"value": "fp32"}), on=IDENTITY, how="inner", nulls_equal=True)
            # scores only: timings, training losses and MLflow's system monitor differ between any two runs
            .filter(~pl.col("metric").str.contains(r"^(time|train|system)/"))
            .with_columns(diff=(pl.col("bf16") - pl.col("fp32")).abs()))
    print(f"{both.height} (run, step, metric) values matched between {args.bf16} and {args.fp32}")
    worst = (both.sort("diff", descending=True).group_by("metric", maintain_order=True)
             .agg(max_abs_diff=pl.col("diff").first(), mean_abs_diff=pl.col("diff").mean(), n=pl.len(),
                  where=pl.format("{} {} seed {} step {}", "algorithm", "order", "seed", "step").first())
             .sort("metric"))
    with pl.Config(tbl_rows=40, tbl_width_chars=200, fmt_str_lengths=60):
        print(worst)
    tables = {name: final_forget(frames[name]) for name in frames}
    joined = tables["bf16"].join(tables["fp32"], on=["algorithm", "params", "p"], suffix="_fp32", nulls_equal=True)
    flips = 0
    for (alg, params), part in joined.group_by(["algorithm", "params"], maintain_order=True):
        part = part.sort("p")
        rank_b = part.sort("mean")["p"].to_list()
        rank_f = part.sort("mean_fp32")["p"].to_list()
        recency_b, recency_f = rank_b[0] == 4, rank_f[0] == 4
        flips += recency_b != recency_f
        cells = "  ".join(f"p{r['p']} {r['mean']:+.3f}/{r['mean_fp32']:+.3f}" for r in part.iter_rows(named=True))
        print(f"{alg} {params or ''}: final forget score bf16/fp32 eval: {cells} | least forgetting p: "
              f"bf16 {rank_b[0]}, fp32 {rank_f[0]} | order of p by forget score bf16 {rank_b}, fp32 {rank_f}")
    print(f"recency verdicts (p = 4 forgets least) that flip between bf16 and fp32 evaluation: {flips}")


if __name__ == "__main__":
    main()
