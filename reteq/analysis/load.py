"""MLflow -> polars: the one place the analysis reads a sweep.

Runs come from MLflow's paged run search (reteq.mlflow_store) (paged, so thousands of runs cost a handful of queries). Metric
histories are the bulk of the data: on a SQLite store they are read with ONE SQL query straight from the
`metrics` table (MLflow's client offers no bulk history call, and one call per run x metric is thousands of
round trips); any other store falls back to `get_metric_history` calls run in a small thread pool.
Everything downstream receives typed columns: p / seed / step are integers, lr / beta / value are floats.
A leaf's method knobs arrive as `params` (canonical "beta=0.5" / "coeff=20,layer=2", null for GA), which the
analysis groups cells by, and as one float column per knob name of the registry (null where a run's method has
no such knob): a new method adds columns without code here.
"""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl

from reteq import tracking as T
from reteq.algorithms import ALGORITHMS
from reteq.errors import BadInput
from reteq.mlflow_store import iter_runs, reader

KNOB_COLUMNS = tuple(sorted({k for a in ALGORITHMS.values() for k in a.knobs} - {"beta"}))
RUN_COLUMNS = ("model", "order", "p", "algorithm", "lr", "beta", "params", *KNOB_COLUMNS, "scheduler", "seed")
METRIC_COLUMNS = ("run_id", *RUN_COLUMNS, "kind", "status", "step", "metric", "value")

_RUN_SCHEMA = {
    "run_id": pl.String,
    "run_name": pl.String,
    "parent_run_id": pl.String,
    "kind": pl.String,
    "model": pl.String,
    "order": pl.String,
    "p": pl.Int64,
    "algorithm": pl.String,
    "lr": pl.Float64,
    "beta": pl.Float64,
    "params": pl.String,
    **{k: pl.Float64 for k in KNOB_COLUMNS},
    "scheduler": pl.String,
    "seed": pl.Int64,
    "status": pl.String,
    "node_key": pl.String,
    "start_time": pl.Datetime("ms", "UTC"),
}
_TAG_COLUMNS = {
    "kind": T.TAG_KIND,
    "model": T.TAG_MODEL,
    "order": T.TAG_ORDER,
    "p": T.TAG_P,
    "algorithm": T.TAG_ALGORITHM,
    "lr": T.TAG_LR,
    "beta": T.TAG_BETA,
    "params": T.TAG_PARAMS,
    "scheduler": T.TAG_SCHEDULE,
    "seed": T.TAG_SEED,
    "status": T.TAG_STATUS,
    "node_key": T.TAG_PLAN_KEY,
}
_PARENT_TAG = T.TAG_MLFLOW_PARENT


class UnknownExperiment(BadInput, ValueError):
    """`--experiment` names no experiment of the store (a typo): one line naming those that exist, exit 2."""


def experiment_id(tracking_uri: str, experiment: str) -> str:
    """Resolve an experiment given by name (or, failing that, by id); a clear error when it does not exist."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        raise UnknownExperiment(f"no MLflow store at {tracking_uri.removeprefix('sqlite:///')} (nothing was "
                                f"recorded there): no experiment {experiment!r}")  # and none made by asking
    client = reader(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None and str(experiment).isdigit():
        try:
            found = client.get_experiment(str(experiment))
        except Exception:  # noqa: BLE001 - MLflow raises its own error type for unknown ids
            found = None
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UnknownExperiment(f"no MLflow experiment named {experiment!r} in {tracking_uri}; "
                                f"{'it has: ' + ', '.join(names) if names else 'it has none'}")
    return found.experiment_id


def load_runs(tracking_uri: str, experiment: str) -> pl.DataFrame:
    """One row per counted run of the experiment (the sweep parent included), identity tags typed.

    Empty tags ("" for GA's beta, or a tag a writer did not set) become nulls, so `p`, `lr`, `beta` and `seed`
    can be numeric columns. Runs that did not finish, and second finished runs of a key, are left out: see
    `load_run_record`.
    """
    return load_run_record(tracking_uri, experiment)[0]


_EXCLUDED_SCHEMA = {"run_id": pl.String, "run_name": pl.String, "kind": pl.String, "node_key": pl.String,
                    "mlflow_status": pl.String, "reason": pl.String}


def load_run_record(tracking_uri: str, experiment: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(counted runs, excluded runs with the reason each was left out).

    A result is a run MLflow calls FINISHED, one per node or leaf key (the oldest; a later one is a duplicate).
    A RUNNING, KILLED or FAILED run ended early: its last metric is an early step, so averaging it in would
    change the tables. The sweep's parent run is always kept (it holds no results).
    """
    rows, excluded, seen = [], [], set()
    runs = sorted(iter_runs(reader(tracking_uri), experiment_id(tracking_uri, experiment)),
                  key=lambda r: (r.info.start_time or 0, r.info.run_id))
    for run in runs:
        tags = run.data.tags
        kind, key, status = tags.get(T.TAG_KIND), tags.get(T.TAG_PLAN_KEY) or None, run.info.status
        reason = None
        if kind != T.KIND_SWEEP and status != T.RUN_FINISHED:
            why = (tags.get(T.TAG_ERROR) or "").splitlines()[:1]
            reason = f"{status}: did not finish" + (f" ({why[0][:200]})" if why else "")
        elif kind != T.KIND_SWEEP and key is not None and key in seen:
            reason = "FINISHED again: a second run of a key that already has a finished run"
        if reason is not None:
            excluded.append({"run_id": run.info.run_id, "run_name": run.info.run_name, "kind": kind,
                             "node_key": key, "mlflow_status": status, "reason": reason})
            continue
        if key is not None and kind != T.KIND_SWEEP:
            seen.add(key)
        row = {col: tags.get(k) or None for col, k in _TAG_COLUMNS.items()}
        row["scheduler"] = row["scheduler"] or tags.get(T.TAG_SCHEDULE_BEFORE_RENAME) or None  # older runs
        if T.TAG_PARAMS not in tags and row["beta"]:  # a run recorded before knobs were general
            row["params"] = f"beta={row['beta']}"
        row.update(
            run_id=run.info.run_id,
            run_name=run.info.run_name,
            parent_run_id=tags.get(_PARENT_TAG),
            start_time=run.info.start_time,
        )
        rows.append(row)
    return _typed_runs(rows), pl.DataFrame(excluded, schema=_EXCLUDED_SCHEMA, orient="row")


def _typed_runs(rows: list[dict]) -> pl.DataFrame:
    """Tags arrive as strings; cast the numeric ones (unparseable or empty -> null) and the start time."""
    if not rows:
        return pl.DataFrame(schema=_RUN_SCHEMA)
    as_logged = {k: pl.String for k in _RUN_SCHEMA if k != "start_time" and k not in KNOB_COLUMNS
                 } | {"start_time": pl.Int64}
    raw = pl.DataFrame(rows, schema=as_logged, orient="row").with_columns(
        pl.col("params").str.extract(rf"(?:^|,){k}=([^,]+)").alias(k) for k in KNOB_COLUMNS)
    numeric = {"p": pl.Int64, "seed": pl.Int64, "lr": pl.Float64, "beta": pl.Float64,
               **{k: pl.Float64 for k in KNOB_COLUMNS}}
    return (
        raw.with_columns(
            *[pl.col(c).str.strip_chars().cast(t, strict=False) for c, t in numeric.items()],
            pl.col("start_time").cast(pl.Datetime("ms")).dt.replace_time_zone("UTC"),
        )
        .select(list(_RUN_SCHEMA))
        .sort("start_time", "run_id")
    )


def load_metrics(
    tracking_uri: str,
    experiment: str,
    kinds: tuple[str, ...] = (T.KIND_UNLEARN,),
    runs: pl.DataFrame | None = None,
    sqlite_fast_path: bool = True,
) -> pl.DataFrame:
    """Tidy step metrics: one row per (run, metric, step) with the run's identity columns attached.

    When a metric was logged twice at one step, the later timestamp wins (a resumed run re-logs its last
    eval). Pass `runs` (from `load_runs`) to avoid searching the runs a second time.
    """
    if runs is None:
        runs = load_runs(tracking_uri, experiment)
    runs = runs.filter(pl.col("kind").is_in(list(kinds)))
    exp_id = experiment_id(tracking_uri, experiment)
    raw = None
    if sqlite_fast_path and tracking_uri.startswith("sqlite:///") and runs.height:
        raw = _sqlite_histories(tracking_uri, exp_id, kinds)
    if raw is None:
        raw = _client_histories(tracking_uri, exp_id, set(runs["run_id"].to_list()))
    latest = (
        raw.sort("timestamp", "value", nulls_last=False)
        .unique(["run_id", "metric", "step"], keep="last", maintain_order=True)
        .drop("timestamp")
    )
    return (
        latest.join(runs.select("run_id", *RUN_COLUMNS, "kind", "status"), on="run_id", how="inner")
        .select(METRIC_COLUMNS)
        .sort("run_id", "metric", "step")
    )


_RAW_SCHEMA = {
    "run_id": pl.String,
    "metric": pl.String,
    "step": pl.Int64,
    "value": pl.Float64,
    "timestamp": pl.Int64,
}

_SQL = """
SELECT m.run_uuid, m.key, m.step, CASE WHEN m.is_nan THEN NULL ELSE m.value END, m.timestamp
FROM metrics m
JOIN runs r ON r.run_uuid = m.run_uuid
JOIN tags t ON t.run_uuid = m.run_uuid AND t.key = ?
WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active' AND t.value IN ({marks})
"""


def _sqlite_histories(tracking_uri: str, exp_id: str, kinds: tuple[str, ...]) -> pl.DataFrame | None:
    """All histories of the experiment's runs of these kinds in one read-only query; None if unreadable."""
    path = Path(tracking_uri[len("sqlite:///") :]).expanduser().resolve()
    if not path.is_file():
        return None
    try:
        con = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            sql = _SQL.format(marks=",".join("?" * len(kinds)))
            rows = con.execute(sql, (T.TAG_KIND, int(exp_id), *kinds)).fetchall()
        finally:
            con.close()
    except (sqlite3.Error, ValueError):
        return None  # schema drift or a locked file: the client path still works
    frame = (
        pl.DataFrame(rows, schema=list(_RAW_SCHEMA), orient="row")
        if rows
        else pl.DataFrame(schema=_RAW_SCHEMA)
    )
    return frame.cast(_RAW_SCHEMA).with_columns(pl.col("value").fill_nan(None))


def _client_histories(tracking_uri: str, exp_id: str, run_ids: set[str], workers: int = 8) -> pl.DataFrame:
    """The general path (REST, Postgres, ...): one `get_metric_history` per (run, metric), threaded.

    The metric keys of each run come from the same paged search that lists the runs (no per-run lookup).
    """
    client = reader(tracking_uri)
    keys = [
        (run.info.run_id, key)
        for run in iter_runs(reader(tracking_uri), exp_id)
        if run.info.run_id in run_ids
        for key in run.data.metrics
    ]

    def history(pair: tuple[str, str]) -> list[tuple]:
        rid, key = pair
        return [(rid, key, m.step, m.value, m.timestamp) for m in client.get_metric_history(rid, key)]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = [row for chunk in pool.map(history, keys) for row in chunk]
    if not rows:
        return pl.DataFrame(schema=_RAW_SCHEMA)
    return (
        pl.DataFrame(rows, schema=list(_RAW_SCHEMA), orient="row")
        .cast(_RAW_SCHEMA)
        .with_columns(pl.col("value").fill_nan(None))
    )
