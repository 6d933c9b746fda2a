"""Retrain equivalence, measured: RE distance along unlearning, path divergence in prediction space, R/C/U depth.

Inputs are what the sweep logged: the step metrics re/logp_mse and re/kl (distance of each unlearning run to its
retrain node theta_r, `reteq.eval.probe`), and each run's prediction-vector artifact (step x probe pair: the
per-token mean log-prob `logp` and the target-token log-probs `token_logp`). Outputs are polars frames.

Pairwise divergence between two orders p, q of one cell at step t (both symmetric, both 0 for identical models):
  d_logp_mse(t) = mean over probe pairs x of (s_p(x, t) - s_q(x, t))^2          (the paper's d, Pred = scores)
  d_kl_sym(t)   = mean over target positions of J(b_p, b_q), where b is the model's probability of the target
                  token, J(a, b) = (a - b)(log a - log b) + (b - a)(log(1 - a) - log(1 - b)) the symmetrised KL
                  (Jeffreys) of the two Bernoulli coarsenings {target token, any other}. By data processing it is
                  a lower bound of the symmetrised full-vocabulary KL at that position, and it needs only the
                  stored per-token log-probs (full distributions are never stored).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import mlflow
import polars as pl

from reteq import tracking as T
from reteq.analysis.divergence import CELL, GROWS_R2
from reteq.analysis.gaps import growth_rate
from reteq.mlflow_store import reader

RUN_ID_COLUMNS = ("run_id", *CELL, "order", "p")
DISTANCE_TITLES = {T.M_RE_LOGP_MSE: "log-prob MSE to θ_r", T.M_RE_KL: "token KL(π_u ‖ π_r)"}
PAIR_DISTANCES = {"d_logp_mse": "log-prob MSE between orders", "d_kl_sym": "symmetric target-token KL"}
_P_EPS = 1e-12


# ---- loading -------------------------------------------------------------------------------------------------

def load_vectors(tracking_uri: str, runs: pl.DataFrame) -> pl.DataFrame:
    """Every unlearning run's prediction-vector artifact, concatenated, with the run's identity columns."""
    frames = []
    unlearn = runs.filter(pl.col("kind") == T.KIND_UNLEARN)
    with tempfile.TemporaryDirectory() as tmp:
        for row in unlearn.select(RUN_ID_COLUMNS).iter_rows(named=True):
            try:
                got = mlflow.artifacts.download_artifacts(
                    run_id=row["run_id"], artifact_path=f"{T.ARTIFACT_PREDICTIONS}/{T.PREDICTIONS_FILE}",
                    dst_path=str(Path(tmp) / row["run_id"]), tracking_uri=tracking_uri)
            except Exception:  # noqa: BLE001 - a run without vectors (older sweep, crashed run) is skipped
                continue
            v = pl.read_parquet(got)
            frames.append(v.with_columns(**{k: pl.lit(row[k], dtype=runs.schema[k]) for k in RUN_ID_COLUMNS}))
    if not frames:
        return pl.DataFrame()
    return pl.concat(frames, how="diagonal_relaxed")


def vocab_size(tracking_uri: str, runs: pl.DataFrame) -> int | None:
    """The tokenizer vocabulary logged by the unlearning runs (the first one that has it)."""
    c = reader(tracking_uri)
    for rid in runs.filter(pl.col("kind") == T.KIND_UNLEARN)["run_id"].to_list()[:5]:
        v = c.get_run(rid).data.params.get(T.P_VOCAB_SIZE)
        if v:
            return int(v)
    return None


# ---- distance to theta_r -------------------------------------------------------------------------------------

def re_table(metrics: pl.DataFrame) -> pl.DataFrame:
    """Per run and RE distance: value at step 0, minimum (and its step), final value, and the net move.

    direction = "towards θ_r" when the final distance is below the start, "away" when above.
    """
    df = metrics.filter(pl.col("metric").is_in(list(T.RE_METRICS)) & pl.col("value").is_finite()).sort("step")
    if not df.height:
        return pl.DataFrame()
    keys = ["run_id", *CELL, "p", "order", "metric"]
    out = df.group_by(keys, maintain_order=True).agg(
        start=pl.col("value").filter(pl.col("step") == pl.col("step").min()).first(),
        min=pl.col("value").min(),
        min_step=pl.col("step").get(pl.col("value").arg_min()),
        final=pl.col("value").last(),
        final_step=pl.col("step").last(),
    )
    change = pl.col("final") - pl.col("start")
    return (
        out.with_columns(
            change=change,
            rel_change=change / pl.col("start"),
            direction=pl.when(change < 0).then(pl.lit("towards θ_r")).when(change > 0).then(pl.lit("away"))
            .otherwise(pl.lit("unchanged")),
        )
        .rename({"metric": "distance"})
        .sort(["model", "algorithm", "lr", "params", "seed", "distance", "p"], nulls_last=True)
    )


# ---- theta_r beside the unlearned models -----------------------------------------------------------------------

BASELINE_METRICS = {T.M_FORGET_LABEL: "label_logp", T.M_FORGET_PARAPHRASE: "paraphrase_logp",
                    T.M_TOFU_LOGP: "tofu_logp", T.M_MATH_ACC: "math_acc"}


def baseline_table(metrics: pl.DataFrame, retrain: pl.DataFrame) -> pl.DataFrame:
    """What retraining gives beside what unlearning gives: each theta_r's eval (its run of kind retrain) and the
    unlearned runs at step 0 and at their last step (mean over seeds), on the same metrics; empty without any
    theta_r."""
    keys = list(BASELINE_METRICS)
    frames = []
    r = retrain.filter(pl.col("metric").is_in(keys) & pl.col("value").is_finite()) if retrain.height else retrain
    if not r.height:  # no theta_r recorded (eval.retrain off, an older sweep): nothing to set beside
        return pl.DataFrame()
    frames.append(r.group_by(["model", "order", "metric"]).agg(pl.col("value").mean())
                  .with_columns(model_is=pl.lit("θ_r (retain stages only)"), algorithm=pl.lit(None, pl.String),
                                    lr=pl.lit(None, pl.Float64), p=pl.lit(None, pl.Int64), step=pl.lit(None, pl.String)))
    u = metrics.filter(pl.col("metric").is_in(keys) & pl.col("value").is_finite())
    if u.height:
        last = u.group_by("run_id").agg(pl.col("step").max().alias("last"))
        u = u.join(last, on="run_id").filter((pl.col("step") == 0) | (pl.col("step") == pl.col("last")))
        u = u.with_columns(step=pl.when(pl.col("step") == 0).then(pl.lit("0")).otherwise(pl.lit("final")))
        frames.append(u.group_by(["model", "order", "algorithm", "lr", "p", "step", "metric"])
                      .agg(pl.col("value").mean()).with_columns(model_is=pl.lit("unlearned")))
    if not frames:
        return pl.DataFrame()
    cols = ["model", "model_is", "order", "p", "algorithm", "lr", "step", "metric", "value"]
    long = pl.concat([f.select(cols) for f in frames], how="vertical_relaxed")
    wide = long.pivot(on="metric", index=cols[:-2], values="value")
    wide = wide.rename({k: v for k, v in BASELINE_METRICS.items() if k in wide.columns})
    wide = wide.select(*cols[:-2], *[v for v in BASELINE_METRICS.values() if v in wide.columns])
    return wide.sort(["model", "model_is", "p", "algorithm", "lr", "step"], descending=[False, True, False, False,
                     False, False], nulls_last=False)  # θ_r first, then the unlearned runs by p


# ---- pairwise divergence in prediction space -------------------------------------------------------------------

def _jeffreys_bernoulli(la: pl.Expr, lb: pl.Expr) -> pl.Expr:
    pa, pb = la.exp(), lb.exp()
    qa = (1 - pa).clip(_P_EPS, 1.0).log()
    qb = (1 - pb).clip(_P_EPS, 1.0).log()
    return (pa - pb) * (la - lb) + (pb - pa) * (qa - qb)


def prediction_divergence(vectors: pl.DataFrame) -> pl.DataFrame:
    """Per cell, pair of orders (order_a < order_b) and eval step: d_logp_mse and d_kl_sym (module docstring).

    Repeated runs of one order in a cell are averaged pair by pair first."""
    schema = {**{c: pl.String for c in ("order_a", "order_b")}, "p_a": pl.Int64, "p_b": pl.Int64,
              "step": pl.Int64, "d_logp_mse": pl.Float64, "d_kl_sym": pl.Float64}
    if not vectors.height or "logp" not in vectors.columns:
        return pl.DataFrame(schema=schema)
    key = [*CELL, "step", "pair"]
    scores = vectors.group_by([*key, "order", "p"]).agg(pl.col("logp").mean())
    tokens = (
        vectors.select(*key, "order", "p", "token_logp")
        .with_columns(pos=pl.int_ranges(pl.col("token_logp").list.len()))
        .explode("token_logp", "pos")
        .group_by([*key, "order", "p", "pos"]).agg(pl.col("token_logp").cast(pl.Float64).mean())
    )

    def pairs(df: pl.DataFrame, on: list[str]) -> pl.DataFrame:
        joined = df.join(df, on=on, suffix="_b", nulls_equal=True)
        return joined.filter(pl.col("order") < pl.col("order_b")).rename({"order": "order_a", "p": "p_a"})

    cell_step = [*CELL, "step"]
    d_logp = (pairs(scores, key)
              .group_by([*cell_step, "order_a", "order_b", "p_a", "p_b"])
              .agg(d_logp_mse=((pl.col("logp") - pl.col("logp_b")) ** 2).mean()))
    d_kl = (pairs(tokens, [*key, "pos"])
            .group_by([*cell_step, "order_a", "order_b"])
            .agg(d_kl_sym=_jeffreys_bernoulli(pl.col("token_logp"), pl.col("token_logp_b")).mean()))
    return (d_logp.join(d_kl, on=[*cell_step, "order_a", "order_b"], how="left", nulls_equal=True)
            .sort([*CELL, "p_a", "p_b", "step"], nulls_last=True))


def divergence_growth(pairdiv: pl.DataFrame) -> pl.DataFrame:
    """Growth fit (gaps.growth_rate: slope of log d against step, R², grows) per cell, order pair and distance,
    plus a row per cell and distance for the max over pairs (order_a = order_b = "max over pairs")."""
    if not pairdiv.height:
        return pl.DataFrame()
    long = pairdiv.unpivot(index=[*CELL, "order_a", "order_b", "step"], on=list(PAIR_DISTANCES),
                           variable_name="distance", value_name="d")
    maxed = (long.group_by([*CELL, "distance", "step"]).agg(pl.col("d").max())
             .with_columns(order_a=pl.lit("max over pairs"), order_b=pl.lit("max over pairs")))
    rows = []
    for part in pl.concat([long, maxed.select(long.columns)]).sort("step").partition_by(
            [*CELL, "order_a", "order_b", "distance"], maintain_order=True):
        fit = growth_rate(part["step"].to_numpy(), part["d"].to_numpy())
        first = part.row(0, named=True)
        rows.append({**{c: first[c] for c in [*CELL, "order_a", "order_b", "distance"]},
                     "d_start": part["d"][0], "d_final": part["d"][-1], "rate": fit.rate,
                     "growth_factor": math.exp(fit.rate) if math.isfinite(fit.rate) else math.nan,
                     "r2": fit.r2, "n_points": fit.n, "grows": bool(fit.rate > 0 and fit.r2 >= GROWS_R2)})
    return pl.DataFrame(rows, orient="row").sort([*CELL, "distance", "order_a", "order_b"], nulls_last=True)


# ---- Section 4.3: superficial vs deep --------------------------------------------------------------------------

def depth_labels(metrics: pl.DataFrame, fall: float = 0.5, margin: float = 0.0) -> pl.DataFrame:
    """Per run with R/C/U log-probs: 'deep' when C falls with U and both end below R, 'superficial' when U
    falls but C does not (or stays at or above R), 'no forgetting' when U does not fall.

    'falls' = per-token log-prob drops by at least `fall` nats from the first to the last step; 'below R' =
    at least `margin` below R's final value (eval.depth_fall, eval.depth_margin)."""
    keys = [T.M_DEPTH_R, T.M_DEPTH_C, T.M_DEPTH_U]
    df = metrics.filter(pl.col("metric").is_in(keys) & pl.col("value").is_finite()).sort("step")
    if not df.height:
        return pl.DataFrame()
    ends = df.group_by(["run_id", *CELL, "order", "metric"], maintain_order=True).agg(
        start=pl.col("value").first(), end=pl.col("value").last())
    wide = ends.pivot(on="metric", index=["run_id", *CELL, "order"], values=["start", "end"])
    names = {f"{w}_{k}": f"{w}_{k.split('/')[-1][0]}" for w in ("start", "end") for k in keys}
    wide = wide.rename({k: v for k, v in names.items() if k in wide.columns})
    if not all(c in wide.columns for c in names.values()):
        return pl.DataFrame()
    u_fall = pl.col("start_U") - pl.col("end_U")
    c_fall = pl.col("start_C") - pl.col("end_C")
    below_r = (pl.col("end_U") < pl.col("end_R") - margin) & (pl.col("end_C") < pl.col("end_R") - margin)
    label = (pl.when(u_fall < fall).then(pl.lit("no forgetting"))
             .when((c_fall >= fall) & below_r).then(pl.lit("deep"))
             .otherwise(pl.lit("superficial")))
    return wide.with_columns(U_fall=u_fall, C_fall=c_fall, label=label).sort(["model", "order"], nulls_last=True)


def chance_sentence(metrics: pl.DataFrame, vocab: int | None) -> str | None:
    """The chance level log(1/V) beside the forget-set log-probs at step 0 (mean over runs)."""
    if not vocab:
        return None
    chance = -math.log(vocab)
    s0 = metrics.filter((pl.col("step") == 0) & pl.col("value").is_finite())
    parts = []
    for key, name in ((T.M_FORGET_LABEL, "unlearn label"), (T.M_FORGET_PARAPHRASE, "paraphrases")):
        v = s0.filter(pl.col("metric") == key)["value"]
        if v.len():
            parts.append(f"{name} {float(v.mean()):.2f} ({float(v.mean()) - chance:+.2f} vs chance)")
    if not parts:
        return None
    return (f"Chance level: log(1/{vocab}) = {chance:.2f} nats per token. Forget-set log-probs before unlearning "
            f"(step 0, mean over runs): " + "; ".join(parts) + ".")
