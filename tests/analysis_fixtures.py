"""Planted MLflow sweeps for the analysis tests: curves whose divergence, recency and seed spread are known.

Written the way the sweep writes (reteq.tracking keys, a parent run, children tagged with mlflow.parentRunId,
one log_batch per run), so the tests exercise the real loader against a real SQLite store.

Planted facts, per cell (model, algorithm, lr, beta, scheduler, seed):
- forget/label_logp(p, t) = -0.5 - 0.05 t + SEED_SHIFT[seed] + LABEL_WEIGHT[p] * G0 * exp(rate t). The weights
  span [0, 1], so the max pairwise gap (and the spread) across orders is exactly G0 * exp(rate t).
- forget/score ends at FINAL_SCORE[p] (+ 0.1 * seed); in cells marked recency=False p=4 is NOT the slowest.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities import Metric

from reteq import tracking as T

MODEL = "llama-3.2-1b"
EXPERIMENT = "planted"
STEPS = list(range(0, 21, 2))  # eval every k = 2 optimizer steps, T = 20
G0 = 0.01
LABEL_WEIGHT = {1: 0.0, 2: 1.0, 3: 0.4, 4: 0.7}
SEED_SHIFT = {0: 0.0, 1: 0.3, 2: -0.15}
FINAL_SCORE = {True: {1: 3.0, 2: 2.0, 3: 2.5, 4: 0.5}, False: {1: 3.0, 2: 0.2, 3: 2.5, 4: 1.0}}
STAGES = ("inst", "tofu", "math")


@dataclass(frozen=True)
class Cell:
    algorithm: str
    lr: float
    beta: float | None
    scheduler: str
    seed: int
    rate: float  # planted exponential growth rate of the max gap
    recency: bool  # whether p = 4 forgets least in this cell


CELLS = (
    *[Cell("ga", 1e-5, None, "wsd", s, 0.15, True) for s in (0, 1, 2)],
    *[Cell("npo", 1e-5, 0.5, "wsd", s, 0.08, s != 2) for s in (0, 1, 2)],
    Cell("ga", 5e-5, None, "wsd", 0, 0.25, True),
    Cell("ga", 1e-5, None, "cosine", 0, 0.10, False),
)
RECENCY_SHARE = sum(c.recency for c in CELLS) / len(CELLS)  # 6 / 8


def order_for(p: int) -> str:
    """The paper's main design: inst > tofu > math fixed, U inserted at position p."""
    stages = list(STAGES)
    stages.insert(p - 1, "U")
    return T.order_tag(stages)


def label_logp(cell: Cell, p: int, t: int) -> float:
    return -0.5 - 0.05 * t + SEED_SHIFT[cell.seed] + LABEL_WEIGHT[p] * G0 * math.exp(cell.rate * t)


def forget_score(cell: Cell, p: int, t: int) -> float:
    return (FINAL_SCORE[cell.recency][p] + 0.1 * cell.seed) * t / STEPS[-1]


def _curves(cell: Cell, p: int, with_math: bool) -> dict[str, list[float]]:
    tofu = [-0.8 - 0.01 * p * t / STEPS[-1] for t in STEPS]
    curves = {
        T.M_FORGET_LABEL: [label_logp(cell, p, t) for t in STEPS],
        T.M_FORGET_PARAPHRASE: [label_logp(cell, p, t) - 0.2 for t in STEPS],
        T.M_FORGET_ALL: [-1.0 - forget_score(cell, p, t) for t in STEPS],
        T.M_FORGET_SCORE: [forget_score(cell, p, t) for t in STEPS],
        T.M_TOFU_LOGP: tofu,
        T.M_TOFU_UTILITY: [1 - abs(v - tofu[0]) for v in tofu],
        T.M_TRAIN_LOSS: [2.0 - 0.01 * t for t in STEPS],
    }
    if with_math:
        acc = [0.3 - 0.02 * p * t / STEPS[-1] for t in STEPS]
        curves[T.M_MATH_ACC] = acc
        curves[T.M_MATH_UTILITY] = [a - acc[0] for a in acc]
    return curves


def _tags(kind: str, parent_id: str, **extra: str) -> dict[str, str]:
    return {
        "mlflow.parentRunId": parent_id,
        T.TAG_KIND: kind,
        T.TAG_STATUS: T.STATUS_DONE,
        T.TAG_MODEL: MODEL,
        **extra,
    }


def write_planted(
    tracking_uri: str,
    artifact_root: str,
    experiment: str = EXPERIMENT,
    cells=CELLS,
    metrics: tuple[str, ...] | None = None,
    with_math: bool = True,
    with_finetune: bool = True,
) -> str:
    """Write a planted sweep into a fresh experiment; returns its id. `metrics` keeps only those keys."""
    client = MlflowClient(tracking_uri)
    exp_id = client.create_experiment(experiment, artifact_location=artifact_root)
    parent = client.create_run(
        exp_id, run_name="sweep", tags={T.TAG_KIND: T.KIND_SWEEP, T.TAG_SWEEP: experiment}
    )
    pid = parent.info.run_id
    now = int(time.time() * 1000)
    if with_finetune:
        for p in range(1, 5):
            run = client.create_run(
                exp_id,
                run_name=f"finetune/{p}",
                tags=_tags(
                    T.KIND_FINETUNE, pid, **{T.TAG_ORDER: order_for(p), T.TAG_P: str(p), T.TAG_SEED: "0"}
                ),
            )
            client.log_batch(
                run.info.run_id, [Metric(T.M_TRAIN_LOSS, 3.0 - s / 10, now, s) for s in range(10)]
            )
            client.set_terminated(run.info.run_id)
    for cell in cells:
        for p in range(1, 5):
            tags = _tags(
                T.KIND_UNLEARN,
                pid,
                **{
                    T.TAG_ORDER: order_for(p),
                    T.TAG_P: str(p),
                    T.TAG_ALGORITHM: cell.algorithm,
                    T.TAG_LR: T.format_float(cell.lr),
                    T.TAG_BETA: T.format_float(cell.beta),
                    T.TAG_SEED: str(cell.seed),
                    T.TAG_SCHEDULE: cell.scheduler,
                    T.TAG_PLAN_KEY: f"{cell.algorithm}-{cell.lr}-{cell.scheduler}-{cell.seed}-{p}",
                },
            )
            run = client.create_run(
                exp_id, run_name=T.run_name(T.KIND_UNLEARN, cell.algorithm, str(p)), tags=tags
            )
            batch = [
                Metric(key, value, now, step)
                for key, values in _curves(cell, p, with_math).items()
                if metrics is None or key in metrics
                for step, value in zip(STEPS, values)
            ]
            client.log_batch(run.info.run_id, batch)
            client.set_terminated(run.info.run_id)
    client.set_terminated(pid)
    return exp_id
